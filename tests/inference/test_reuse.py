"""Work reused across calls: the prompt cache and encode_image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gdino import AutoModelForZeroShotObjectDetection
from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention
from gdino.models.grounding_dino.model import GroundingDino


@pytest.fixture(scope="module")
def model(small_dir):
    return AutoModelForZeroShotObjectDetection.from_pretrained(small_dir)


def _same(a, b) -> None:
    assert a.labels == b.labels
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)


@pytest.mark.slow  # every prompt kind twice at 800 pixels
def test_encoded_image_gives_the_same_detections(model, data_dir):
    image = data_dir / "chelsea.png"
    encoded = model.encode_image(image)
    for prompt in ("a cat. a remote control.", ["sofa", "cat"]):
        _same(model.detect(encoded, prompt, box_threshold=0.0), model.detect(image, prompt, box_threshold=0.0))
    many = model.encode_image([image, data_dir / "coffee.png"])
    found = model.detect(many, "a cup.", box_threshold=0.0)
    assert isinstance(found, list) and len(found) == 2
    _same(found[1], model.detect(data_dir / "coffee.png", "a cup.", box_threshold=0.0))


@pytest.mark.slow  # several detect runs at 800 pixels
def test_repeated_prompt_does_not_rerun_bert(model, data_dir):
    calls = []
    handle = model.bert.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.detect(data_dir / "chelsea.png", "a zebra. a lamp.")
        first = len(calls)
        model.detect(data_dir / "coffee.png", "a zebra. a lamp.")
        model.detect([data_dir / "coffee.png", data_dir / "chelsea.png"], "a zebra. a lamp.")
        assert first == 1 and len(calls) == 1
        model.detect(data_dir / "coffee.png", "a lamp.")
        assert len(calls) == 2
    finally:
        handle.remove()


@torch.no_grad()
def test_cached_text_features_equal_the_batch_computation(model):
    tokens = model.processor(text=[["cat", "remote control"], "a very long prompt about many things. and more."])
    args = (tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
    cached = model.text_features(*args)
    direct = GroundingDino.text_features(model, *args)
    real = ~direct.padding_mask
    assert torch.equal(cached.padding_mask, direct.padding_mask)
    assert torch.equal(cached.position_ids, direct.position_ids)
    assert torch.equal(cached.self_attention, direct.self_attention)
    torch.testing.assert_close(cached.features[real], direct.features[real], atol=1e-5, rtol=0)


@pytest.mark.slow  # loads and runs in two precisions
def test_bf16_runs_the_heavy_parts_in_bf16_and_the_rest_in_fp32(small_dir, data_dir):
    low = AutoModelForZeroShotObjectDetection.from_pretrained(small_dir, dtype=torch.bfloat16)
    assert low.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    assert next(low.transformer.encoder.parameters()).dtype == torch.bfloat16
    assert low.transformer.decoder.norm.weight.dtype == torch.float32
    assert low.bbox_embed.layers[0].weight.dtype == torch.float32
    inputs = low.processor(images=data_dir / "chelsea.png", text="a cat.")
    # Reference points reach every deformable layer, bfloat16 ones included, in float32: in
    # bfloat16 a token centre on a 150-pixel-wide level is off by up to half a pixel.
    layers = [m for m in low.modules() if isinstance(m, MultiScaleDeformableAttention)]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[1].dtype)) for m in layers]
    with torch.no_grad():
        out = low(**inputs)  # float32 pixels from the processor are cast where needed
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(layers) and set(seen) == {torch.float32}
    assert {next(m.parameters()).dtype for m in layers} == {torch.bfloat16, torch.float32}  # encoder, decoder
    assert out.pred_boxes.dtype == torch.float32 and torch.isfinite(out.pred_boxes).all()
    found = low.detect(data_dir / "chelsea.png", "a cat.", box_threshold=0.0)
    assert len(found) > 0 and np.isfinite(found.boxes).all()


@pytest.mark.parametrize("change", ["load_state_dict", "assign", "in_place"])
def test_prompt_cache_follows_new_weights(small_dir, change):
    """New text-side weights are used at once, however they arrive: the cache never serves stale features."""
    model = AutoModelForZeroShotObjectDetection.from_pretrained(small_dir)
    tokens = model.processor(text=["a cat. a lamp."])
    args = (tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
    with torch.no_grad():
        before = model.text_features(*args).features
        new = {
            k: v + 0.01 * torch.randn_like(v) if k.startswith(("bert.", "feat_map.")) and v.is_floating_point() else v
            for k, v in model.state_dict().items()
        }
        if change == "in_place":
            for p in model.bert.parameters():
                p.add_(0.01)
        else:
            model.load_state_dict(new, assign=change == "assign")
        cached = model.text_features(*args).features
        direct = GroundingDino.text_features(model, *args).features
    assert (direct - before).abs().max() > 1e-3  # the change matters
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)


@pytest.mark.parametrize("refresh", ["eval", "clear_text_cache"])
def test_prompt_cache_after_a_fused_optimizer_step(small_dir, refresh):
    """A fused AdamW step changes the weights without bumping their version counters (the cache's
    fingerprint cannot see it): switching modes, as a training loop's evaluation does, or
    ``clear_text_cache()`` makes the next call encode with the new weights."""
    model = AutoModelForZeroShotObjectDetection.from_pretrained(small_dir)
    tokens = model.processor(text=["a cat. a lamp."])
    args = (tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
    with torch.no_grad():
        before = model.text_features(*args).features
    optimizer = torch.optim.AdamW(model.bert.parameters(), lr=1e-2, fused=True)
    for p in model.bert.parameters():
        p.grad = torch.ones_like(p)
    versions = [p._version for p in model.bert.parameters()]
    optimizer.step()
    assert versions == [p._version for p in model.bert.parameters()]  # what makes this case special
    if refresh == "eval":
        model.train()
        model.eval()
    else:
        model.clear_text_cache()
    with torch.no_grad():
        cached = model.text_features(*args).features
        direct = GroundingDino.text_features(model, *args).features
    assert (direct - before).abs().max() > 1e-3
    torch.testing.assert_close(cached, direct, atol=1e-6, rtol=0)
