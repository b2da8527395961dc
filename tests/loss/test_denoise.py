"""Contrastive denoising queries (``gdino.loss.denoise``): layout, noise, isolation and loss terms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.loss.denoise import DenoiseSettings, make_denoising, noised_boxes
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino
from gdino.utils.boxes import cxcywh_to_xyxy

pytest.importorskip("scipy")

# "a cat. a remote control." and "a cat. a dog. a bird."
IDS = torch.tensor(
    [
        [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102, 0],
        [101, 1037, 4937, 1012, 1037, 3899, 1012, 1037, 4743, 1012],
    ]
)
LABELS = [
    {
        "class_labels": torch.tensor([0, 1, 1]),
        "boxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.3]]),
    },
    {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.5, 0.3]])},
]


def _model() -> GroundingDinoForObjectDetection:
    torch.manual_seed(0)
    config = dataclasses.replace(GroundingDinoConfig.small_test(), auxiliary_loss=True)
    return GroundingDinoForObjectDetection(config)


def _inputs() -> dict[str, torch.Tensor]:
    pixels = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixels, "input_ids": IDS, "attention_mask": (IDS != 0).long()}


def test_layout_groups_and_targets() -> None:
    config = GroundingDinoConfig.small_test()
    dn = make_denoising(IDS, LABELS, config, DenoiseSettings(queries=20), torch.Generator().manual_seed(0))
    assert dn is not None
    assert dn.groups == 3  # 20 // (2 x 3 targets of the first image)
    n = dn.queries.boxes.shape[1]
    assert n == 18 and dn.queries.token_maps.shape == (2, 18, config.max_text_len)
    # Image 0 fills every slot; image 1 (one target) one positive and one negative slot a group.
    assert bool(dn.queries.valid[0].all())
    assert dn.queries.valid[1].nonzero().flatten().tolist() == [0, 3, 6, 9, 12, 15]
    assert dn.positive[1].nonzero().flatten().tolist() == [0, 6, 12]
    # Positive copies must score their phrase's tokens; negative ones and padding nothing.
    assert dn.token_maps[0, 0, 1:3].tolist() == [1.0, 1.0] and dn.token_maps[0, 0].sum() == 2  # "a cat"
    assert dn.token_maps[1, 0, 7:9].tolist() == [1.0, 1.0] and dn.token_maps[1, 0].sum() == 2  # "a bird"
    assert dn.token_maps[:, 3:6].sum() == 0 and dn.token_maps[1, 1:3].sum() == 0
    torch.testing.assert_close(dn.boxes[0, 6:9], LABELS[0]["boxes"])  # group 1's positives' targets
    # Content rows average a phrase's tokens.
    sums = dn.queries.token_maps.sum(-1)
    torch.testing.assert_close(sums[dn.queries.valid], torch.ones(int(dn.queries.valid.sum())))
    groups = dn.queries.groups
    assert groups.shape == (18, 18) and bool(groups[0, 5]) and not bool(groups[0, 6]) and bool(groups[17, 12])


def test_no_targets_no_denoising() -> None:
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert make_denoising(IDS, empty, GroundingDinoConfig.small_test(), DenoiseSettings()) is None
    assert make_denoising(IDS, LABELS, GroundingDinoConfig.small_test(), DenoiseSettings(queries=0)) is None


def test_box_noise_keeps_positives_inside_one_half_size_and_negatives_between_one_and_two() -> None:
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(2000, 1)
    negative = torch.arange(2000) >= 1000
    moved = cxcywh_to_xyxy(noised_boxes(boxes, negative, 0.4, g))
    half = torch.tensor([0.1, 0.05, 0.1, 0.05]) * 0.4
    shift = (moved - cxcywh_to_xyxy(boxes)).abs() / half  # in units of scale x half size
    assert float(shift[:1000].max()) < 1.0 and float(shift[:1000].max()) > 0.95
    assert float(shift[1000:].min()) >= 1.0 - 1e-5 and float(shift[1000:].max()) < 2.0
    near_edge = noised_boxes(
        torch.tensor([[0.02, 0.98, 0.04, 0.04]]).repeat(100, 1), torch.ones(100, dtype=torch.bool), 1.0, g
    )
    corners = cxcywh_to_xyxy(near_edge)
    assert float(corners.min()) >= 0.0 and float(corners.max()) <= 1.0 + 1e-6
    assert torch.equal(noised_boxes(boxes, negative, 0.0), boxes)


def test_label_noise_only_swaps_content_never_the_target() -> None:
    config = GroundingDinoConfig.small_test()
    dn = make_denoising(
        IDS, LABELS, config, DenoiseSettings(queries=600, label_noise=1.0), torch.Generator().manual_seed(0)
    )
    assert dn is not None
    valid = dn.queries.valid[0]
    content = dn.queries.token_maps[0][valid] > 0
    truth = (dn.token_maps[0][valid] > 0) | ~dn.positive[0][valid][:, None]  # negatives: any content
    swapped = (content != (dn.token_maps[0][valid] > 0)).any(-1) & dn.positive[0][valid]
    assert 0.2 < float(swapped.float().sum() / dn.positive[0].sum()) < 0.7  # about half (with prob 1/3 the same)
    assert bool(truth.any(-1).all())


def test_matching_queries_are_unchanged_and_groups_do_not_see_each_other() -> None:
    model = _model().train()
    inputs = _inputs()
    plain = model(**inputs, labels=LABELS)
    torch.manual_seed(1)
    with_dn = model(**inputs, labels=LABELS, denoising=DenoiseSettings(queries=12))
    # Equal but for float rounding (more rows can take another matmul kernel on another CPU); a
    # leak through attention would move logits of tens by far more.
    torch.testing.assert_close(with_dn.logits, plain.logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(with_dn.pred_boxes, plain.pred_boxes, atol=1e-5, rtol=0)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_enc"):
        torch.testing.assert_close(with_dn.loss_dict[key], plain.loss_dict[key], atol=1e-4, rtol=1e-5)
    dn_keys = {k for k in with_dn.loss_dict if "_dn" in k}
    assert dn_keys == {f"loss_{t}_dn{s}" for t in ("ce", "bbox", "giou") for s in ("", "_0")}
    weights = {"ce": 2.0, "bbox": 5.0, "giou": 2.0}
    extra = sum(with_dn.loss_dict[k] * weights[k.split("_")[1]] for k in dn_keys)
    torch.testing.assert_close(with_dn.loss, plain.loss + extra, rtol=1e-5, atol=1e-4)
    assert with_dn.denoise_logits is not None and with_dn.denoise_logits.shape[:3] == (2, 2, 12)

    # Moving group 1's boxes changes group 1's predictions only.
    torch.manual_seed(1)
    dn = make_denoising(inputs["input_ids"], LABELS, model.config, DenoiseSettings(queries=12))
    assert dn is not None and dn.groups == 2
    first = GroundingDino.forward(model, **inputs, intermediate=True, denoise=dn.queries)
    moved = dataclasses.replace(dn.queries, boxes=dn.queries.boxes.clone())
    moved.boxes[:, 6:] = moved.boxes[:, 6:].flip(-1).clamp(0.05, 0.95)
    second = GroundingDino.forward(model, **inputs, intermediate=True, denoise=moved)
    assert first.denoise_logits is not None and second.denoise_logits is not None
    torch.testing.assert_close(second.denoise_logits[:, :, :6], first.denoise_logits[:, :, :6], atol=1e-4, rtol=1e-5)
    change = (
        (second.denoise_logits[:, :, 6:] - first.denoise_logits[:, :, 6:]).detach().nan_to_num(0.0)
    )  # -inf: padding
    assert float(change.abs().max()) > 1e-3
    torch.testing.assert_close(second.logits, first.logits, atol=1e-4, rtol=1e-5)


def test_denoising_trains_the_decoder_and_lowers_its_loss() -> None:
    model = _model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    inputs = _inputs()
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        out = model(**inputs, labels=LABELS, denoising=DenoiseSettings(queries=12, box_noise=0.4))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(sum(float(v) for k, v in out.loss_dict.items() if "_dn" in k))
    assert losses[-1] < 0.7 * losses[0], losses


def test_denoising_alone_has_gradients_in_the_decoder_not_the_proposal_head() -> None:
    model = _model().train()
    out = model(**_inputs(), labels=LABELS, denoising=DenoiseSettings(queries=12))
    out.loss_dict["loss_bbox_dn"].backward()
    assert model.bbox_embed.layers[0].weight.grad is not None and model.bbox_embed.layers[0].weight.grad.abs().sum() > 0
    assert model.transformer.decoder.layers[0].cross_attn.value_proj.weight.grad.abs().sum() > 0
    assert model.transformer.enc_out_bbox_embed.layers[0].weight.grad is None  # no path from the copies


def test_a_fresh_model_refines_boxes_at_the_scale_its_box_head_is_trained_at() -> None:
    """The box head refines references from the decoder's output before its final norm and is
    trained on the output after it: from scratch, that norm must start at unit scale (at 0.1 each
    refinement step is ~10x the trained one), while the encoder output's norm starts small."""
    from gdino.training.trainer import from_config

    model = from_config(GroundingDinoConfig.small_test(), seed=0)
    assert torch.equal(model.transformer.decoder.norm.weight, torch.ones(64))
    assert torch.equal(model.transformer.enc_output_norm.weight, torch.full((64,), 0.1))
    x = torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(0))
    x = torch.nn.functional.layer_norm(x, (64,))  # a decoder layer's output is layer-normed (norm3)
    head = model.bbox_embed.layers
    for layer in head:  # a trained-looking head: nonzero last layer
        torch.nn.init.normal_(layer.weight, std=0.2)
    torch.testing.assert_close(
        model.bbox_embed(model.transformer.decoder.norm(x)), model.bbox_embed(x), atol=1e-4, rtol=0
    )
