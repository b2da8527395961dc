"""Low-rank adapters (``gdino.training.lora``): the start equals the base model, only adapters
train, merging gives plain layers with ``W + alpha/r B A``, and bad targets are refused.

No training here (``test_lora_training.py`` trains); the model is the small test preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.training.lora import (
    DEFAULT_TARGETS,
    LoRALinear,
    adapters,
    apply_lora,
    load_lora_state,
    lora_state_dict,
    matching,
    merge_lora,
    merged,
)
from gdino.training.settings import TrainError, TrainSettings
from gdino.training.trainer import from_config, set_image_size, skeleton


@pytest.fixture(scope="module")
def plain() -> nn.Module:
    return from_config(GroundingDinoConfig.small_test(), 0)


def _model(plain: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(plain)


def _randomise(model: nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices, as after some training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=generator) * 0.05)


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    processor = set_image_size(model.processor, 96)  # type: ignore[arg-type]
    return dict(processor(images=image, text="red circle. blue square.").items())


def test_a_wrapped_linear_starts_as_its_base_and_adds_the_scaled_update():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6)
    assert layer.scale == 2.0 and layer.lora_a.shape == (2, 6) and layer.lora_b.shape == (5, 2)
    assert torch.equal(layer(x), nn.functional.linear(x, w, b)) and torch.equal(layer.weight, w)
    assert 0 < layer.lora_a.abs().max() <= 6**-0.5  # nn.Linear's bound, 1/sqrt(in)
    with torch.no_grad():
        layer.lora_b.normal_()
    expected = x @ (w + 2.0 * layer.lora_b @ layer.lora_a).T + b
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.weight, w + 2.0 * layer.lora_b @ layer.lora_a)
    assert torch.allclose(layer.merged()(x), expected, atol=1e-5)
    assert not base.weight.requires_grad and layer.lora_a.requires_grad and layer.lora_b.requires_grad


def test_default_targets_and_only_adapters_train(plain):
    model = _model(plain)
    names = apply_lora(model, DEFAULT_TARGETS, rank=4, alpha=4.0)
    assert len(names) == 26  # small_test: 1 enhancer layer (6 fusion, 3 text, 4 image), 2 decoder layers (6), feat_map
    assert "feat_map" in names and "transformer.encoder.fusion_layers.0.attn.v_proj" in names
    assert "transformer.decoder.layers.1.ca_text.out_proj" in names
    assert not any(n.startswith(("backbone.", "bert.", "bbox_embed")) or "sampling_offsets" in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 14848


def test_the_adapted_model_starts_as_the_base_model(plain):
    model = _model(plain)
    apply_lora(model, DEFAULT_TARGETS, rank=4, alpha=8.0)
    inputs = _inputs(model)
    with torch.no_grad():
        before, after = plain.eval()(**inputs), model.eval()(**inputs)
    assert torch.equal(before.pred_boxes, after.pred_boxes)
    assert torch.equal(before.logits, after.logits)


def test_merging_gives_plain_layers_with_the_same_outputs(plain):
    model = _model(plain)
    names = apply_lora(model, ["transformer.decoder", "transformer.encoder.fusion_layers"], rank=3, alpha=3.0)
    _randomise(model)
    inputs = _inputs(model)
    with torch.no_grad():
        adapted = model.eval()(**inputs)
        assert not torch.allclose(adapted.logits, plain.eval()(**inputs).logits, atol=1e-2)  # the update does act
        effective = {n: adapters(model)[n].weight.clone() for n in names}
        assert merge_lora(model) == names and not adapters(model)
        plain_out = model(**inputs)
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(model.get_submodule(n).weight, effective[n]) for n in names)
    assert torch.allclose(plain_out.pred_boxes, adapted.pred_boxes, atol=1e-5)
    assert torch.allclose(plain_out.logits, adapted.logits, atol=1e-4)


def test_merged_for_a_while_leaves_the_adapters_as_they_were(plain):
    model = _model(plain)
    names = apply_lora(model, DEFAULT_TARGETS, rank=2, alpha=2.0)
    _randomise(model)
    layers = adapters(model)
    params = [id(p) for p in model.parameters()]
    with merged(model):
        state = model.state_dict()
        assert state.keys() == plain.state_dict().keys() and not adapters(model)
        assert torch.equal(state[f"{names[0]}.weight"], layers[names[0]].weight)
    assert adapters(model) == layers and [id(p) for p in model.parameters()] == params


def test_adapter_weights_round_trip(plain):
    model, other = _model(plain), _model(plain)
    apply_lora(model, DEFAULT_TARGETS, rank=2, alpha=2.0)
    apply_lora(other, DEFAULT_TARGETS, rank=2, alpha=2.0, seed=5)
    _randomise(model)
    state = lora_state_dict(model)
    assert len(state) == 52 and state["feat_map.lora_a"].shape == (2, 64)
    load_lora_state(other, state)
    assert all(torch.equal(v, lora_state_dict(other)[k]) for k, v in state.items())
    with pytest.raises(TrainError, match="do not fit"):
        load_lora_state(other, {k: v for k, v in state.items() if "feat_map" not in k})


def test_a_pattern_that_selects_nothing_is_refused_with_layer_names(plain):
    model = _model(plain)
    with pytest.raises(TrainError) as e:
        apply_lora(model, ["transformer.decoder", "transformer.nothing"], rank=4, alpha=4.0)
    message = str(e.value)
    assert "'transformer.nothing' matches no linear layer" in message
    assert "transformer.decoder.layers.*.linear1" in message and "feat_map" in message
    assert not adapters(model)
    with pytest.raises(TrainError, match="at least 1"):
        apply_lora(model, DEFAULT_TARGETS, rank=0, alpha=1.0)
    apply_lora(model, ["feat_map"], rank=1, alpha=1.0)
    with pytest.raises(TrainError, match="already has LoRA adapters"):
        apply_lora(model, ["transformer.decoder"], rank=1, alpha=1.0)


def test_targets_are_checked_on_a_skeleton_without_weights():
    model = skeleton("config:tiny")
    assert next(model.parameters()).device.type == "meta"
    assert len(matching(model, DEFAULT_TARGETS)) == 115
    with pytest.raises(TrainError, match="matches no linear layer"):
        matching(model, ["decoder.layers"])  # the decoder is transformer.decoder


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_rank": -1}, "LoRA rank must be 0"),
        ({"lora_rank": 4, "lora_alpha": 0.0}, "alpha must be positive"),
        ({"lora_alpha": 8.0}, "need --lora-rank"),
        ({"lora_targets": ("feat_map",)}, "need --lora-rank"),
    ],
)
def test_bad_lora_settings_are_refused(settings, message):
    with pytest.raises(TrainError, match=message):
        TrainSettings(**settings).check()
