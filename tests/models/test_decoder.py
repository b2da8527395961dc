"""The decoder and the prediction heads against Hugging Face transformers' Grounding DINO."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gdino.checkpoint.convert import hf_to_ours
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.decoder import Decoder
from gdino.models.grounding_dino.heads import MLP, box_logit, contrastive_logits, predict_boxes, refine_boxes
from reference import noised_reference, small_reference_config

SPATIAL_SHAPES = [(8, 10), (4, 5), (2, 3), (1, 2)]  # not square, to catch (h, w) swaps
VALID_HW = [(6, 7), (3, 4), (2, 2), (1, 1)]  # unpadded part of each level for the second image
TEXT_LEN, TEXT_PAD = 7, 3  # the second prompt has TEXT_PAD padding tokens
ATOL = 1e-4


def _hf_config() -> transformers.GroundingDinoConfig:
    # transformers' default 8 heads, as the published model
    return small_reference_config(decoder_layers=3, encoder_attention_heads=8, decoder_attention_heads=8)


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, Decoder, MLP, GroundingDinoConfig]:
    """HF detector with noise on every parameter; our decoder and box head with its weights."""
    hf_config = _hf_config()
    hf = noised_reference(hf_config, noise=0.1)  # HF zeroes the box heads' last layers and the sampling offsets
    config = GroundingDinoConfig.from_hf_dict(hf_config.to_dict())
    sd, unknown = hf_to_ours(hf.state_dict())
    assert not unknown
    decoder = Decoder(config).eval()
    decoder.load_state_dict(_strip(sd, "transformer.decoder."), strict=True)
    box_head = MLP(config.d_model, config.d_model, 4, 3).eval()
    box_head.load_state_dict(_strip(sd, "bbox_embed."), strict=True)
    return hf, decoder, box_head, config


def _inputs(config: GroundingDinoConfig) -> dict[str, torch.Tensor | list[tuple[int, int]]]:
    """A batch of two: the second image and prompt are padded."""
    gen = torch.Generator().manual_seed(2)
    b, q, d = 2, config.num_queries, config.d_model
    masks = []  # per level (B, h, w), True on real pixels
    for (h, w), (vh, vw) in zip(SPATIAL_SHAPES, VALID_HW):
        m = torch.ones(b, h, w, dtype=torch.bool)
        m[1, vh:] = False
        m[1, :, vw:] = False
        masks.append(m)
    # As HF's get_valid_ratio: (valid width / width, valid height / height).
    valid_ratios = torch.stack(
        [torch.stack([m[:, 0, :].sum(1) / m.shape[2], m[:, :, 0].sum(1) / m.shape[1]], -1) for m in masks], 1
    )  # (B, nL, 2)
    text_padding = torch.zeros(b, TEXT_LEN, dtype=torch.bool)
    text_padding[1, -TEXT_PAD:] = True
    boxes = torch.cat([torch.rand(b, q, 2, generator=gen), 0.05 + 0.4 * torch.rand(b, q, 2, generator=gen)], -1)
    return {
        "queries": torch.randn(b, q, d, generator=gen),
        "reference_points": boxes,
        "memory": torch.randn(b, sum(h * w for h, w in SPATIAL_SHAPES), d, generator=gen),
        "memory_padding_mask": ~torch.cat([m.flatten(1) for m in masks], 1),  # (B, S)
        "spatial_shapes": SPATIAL_SHAPES,
        "valid_ratios": valid_ratios,
        "text": torch.randn(b, TEXT_LEN, d, generator=gen),
        "text_padding_mask": text_padding,
    }


def _hf_outputs(hf: torch.nn.Module, x: dict) -> tuple[torch.Tensor, ...]:
    """The decoder called as GroundingDinoModel.forward calls it, then the heads as the detector applies them."""
    shapes = torch.tensor(x["spatial_shapes"], dtype=torch.long)
    out = hf.model.decoder(
        inputs_embeds=x["queries"],
        vision_encoder_hidden_states=x["memory"],
        vision_encoder_attention_mask=~x["memory_padding_mask"],  # HF: True on real pixels here
        text_encoder_hidden_states=x["text"],
        text_encoder_attention_mask=x["text_padding_mask"],  # HF: True on padding tokens here
        reference_points=x["reference_points"],
        spatial_shapes=shapes,
        spatial_shapes_list=x["spatial_shapes"],
        level_start_index=torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]]),
        valid_ratios=x["valid_ratios"],
        self_attn_mask=None,
        return_dict=True,
    )
    hidden = out.intermediate_hidden_states  # (B, L, Q, D)
    logits, boxes = [], []
    for level in range(hidden.shape[1]):
        ref = x["reference_points"] if level == 0 else out.intermediate_reference_points[:, level - 1]
        logits.append(hf.class_embed[level](hidden[:, level], x["text"], ~x["text_padding_mask"]))
        delta = hf.bbox_embed[level](hidden[:, level])
        boxes.append((delta + torch.special.logit(ref, eps=1e-5)).sigmoid())
    return hidden.transpose(0, 1), torch.stack(logits), torch.stack(boxes), out.intermediate_reference_points


def _ours(decoder: Decoder, box_head: MLP, config: GroundingDinoConfig, x: dict) -> tuple[torch.Tensor, ...]:
    hidden, references = decoder(**x, box_heads=[box_head] * config.decoder_layers)
    text, padding = x["text"], x["text_padding_mask"]
    logits = torch.stack([contrastive_logits(h, text, padding, config.max_text_len) for h in hidden])
    return hidden, references, logits, predict_boxes(hidden, references, box_head)


def _alone(x: dict, i: int) -> dict:
    """Sample ``i`` of the batch on its own: each level cropped to its valid part, text unpadded."""
    d = x["memory"].shape[-1]
    levels, start = [], 0
    for (h, w), (vh, vw) in zip(SPATIAL_SHAPES, VALID_HW if i == 1 else SPATIAL_SHAPES):
        levels.append(x["memory"][i, start : start + h * w].view(h, w, d)[:vh, :vw].reshape(-1, d))
        start += h * w
    shapes = list(VALID_HW if i == 1 else SPATIAL_SHAPES)
    n_text = TEXT_LEN - (TEXT_PAD if i == 1 else 0)
    return {
        "queries": x["queries"][i : i + 1],
        "reference_points": x["reference_points"][i : i + 1],
        "memory": torch.cat(levels)[None],
        "memory_padding_mask": None,
        "spatial_shapes": shapes,
        "valid_ratios": torch.ones(1, len(shapes), 2),
        "text": x["text"][i : i + 1, :n_text],
        "text_padding_mask": torch.zeros(1, n_text, dtype=torch.bool),
    }


@torch.no_grad()
def test_decoder_matches_transformers(models) -> None:
    """The unpadded sample equals transformers'; the padded one equals itself decoded alone.

    transformers embeds the query position of a box scaled by the first level's valid ratio, so
    its padded sample depends on the padding; ours does not (see Decoder.query_position).
    """
    hf, decoder, box_head, config = models
    x = _inputs(config)
    hf_hidden, hf_logits, hf_boxes, hf_refs = _hf_outputs(hf, x)
    hidden, references, logits, boxes = _ours(decoder, box_head, config, x)

    assert hidden.shape == (config.decoder_layers, 2, config.num_queries, config.d_model)
    torch.testing.assert_close(hidden[:, 0], hf_hidden[:, 0], atol=ATOL, rtol=0)
    # Layer 0 refines the given boxes, layer l > 0 the boxes HF's decoder refined after layer l - 1.
    torch.testing.assert_close(references[0], x["reference_points"], atol=0, rtol=0)
    torch.testing.assert_close(references[1:, 0], hf_refs[0, :-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(boxes[:, 0], hf_boxes[:, 0], atol=ATOL, rtol=0)
    # -inf exactly where HF has it (padding tokens, columns past the text), close values elsewhere.
    assert logits.shape == (config.decoder_layers, 2, config.num_queries, config.max_text_len)
    assert torch.equal(torch.isinf(logits), torch.isinf(hf_logits))
    assert torch.isinf(logits[:, 1, :, TEXT_LEN - TEXT_PAD :]).all()
    assert torch.isfinite(logits[:, 0, :, :TEXT_LEN]).all()
    finite = torch.isfinite(hf_logits[:, 0])
    torch.testing.assert_close(logits[:, 0][finite], hf_logits[:, 0][finite], atol=ATOL, rtol=1e-5)
    # The refinement really moved the boxes, and the layers really differ.
    assert (boxes[-1] - x["reference_points"]).abs().max() > 1e-2
    assert (hidden[-1] - hidden[0]).abs().max() > 1e-1

    alone = _ours(decoder, box_head, config, _alone(x, 1))
    torch.testing.assert_close(hidden[:, 1], alone[0][:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(boxes[:, 1], alone[3][:, 0], atol=ATOL, rtol=0)
    n_text = TEXT_LEN - TEXT_PAD
    torch.testing.assert_close(logits[:, 1, :, :n_text], alone[2][:, 0, :, :n_text], atol=ATOL, rtol=1e-5)
    # transformers' padded sample does differ (so the comparison above is not vacuous)
    assert (hf_hidden[:, 1] - hidden[:, 1]).abs().max() > 1e-3


@torch.no_grad()
def test_padding_is_ignored(models) -> None:
    """Changing padded pixels or padded text tokens of the second sample changes nothing."""
    _, decoder, box_head, config = models
    x = _inputs(config)
    hidden, references = decoder(**x, box_heads=[box_head] * config.decoder_layers)
    y = dict(x)
    y["memory"] = x["memory"].masked_fill(x["memory_padding_mask"][..., None], 7.0)
    y["text"] = x["text"].masked_fill(x["text_padding_mask"][..., None], -5.0)
    hidden2, references2 = decoder(**y, box_heads=[box_head] * config.decoder_layers)
    torch.testing.assert_close(hidden2, hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(references2, references, atol=1e-5, rtol=0)
    # ... whereas changing real pixels of the second sample does change its queries.
    y["memory"] = x["memory"].masked_fill(~x["memory_padding_mask"][..., None], 7.0)
    hidden3, _ = decoder(**y, box_heads=[box_head] * config.decoder_layers)
    assert (hidden3[:, 1] - hidden[:, 1]).abs().max() > 1e-2


def test_contrastive_logits_matches_transformers() -> None:
    gen = torch.Generator().manual_seed(3)
    queries, text = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 4, 16, generator=gen)
    padding = torch.tensor([[False] * 4, [False, False, True, True]])
    head = transformers.models.grounding_dino.modeling_grounding_dino.GroundingDinoContrastiveEmbedding(
        _hf_config().__class__(max_text_len=9)
    )
    expected = head(queries, text, ~padding)
    got = contrastive_logits(queries, text, padding, 9)
    assert got.shape == (2, 5, 9)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0, :, :4], queries[0] @ text[0].T)
    with pytest.raises(ValueError):
        contrastive_logits(queries, text, padding, 3)


def test_mlp_names_and_relu() -> None:
    mlp = MLP(8, 16, 4, 3)
    assert list(mlp.state_dict()) == [f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    x = torch.randn(3, 8)
    a, b, c = mlp.layers
    torch.testing.assert_close(mlp(x), c(torch.relu(b(torch.relu(a(x))))))


def test_refine_boxes_clamps_reference_as_transformers() -> None:
    """sigmoid(delta + logit(reference)), the reference clamped to [1e-5, 1 - 1e-5] first."""
    logit_eps = math.log(1e-5 / (1 - 1e-5))  # -11.5129...
    delta = torch.tensor([-logit_eps, logit_eps, 0.3], dtype=torch.float64)  # float64: 1 - 1e-5 is inexact in float32
    got = refine_boxes(delta, torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64))
    expected = torch.tensor([0.5, 0.5, 1 / (1 + 3 * math.exp(-0.3))], dtype=torch.float64)  # logit(0.25) = -ln 3
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)


def _inverse_sigmoid_as_the_original(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``inverse_sigmoid`` of the original repository (groundingdino/util/misc.py), step by step."""
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def test_box_logit_original_differs_from_transformers_at_the_clamp() -> None:
    x = torch.tensor([-0.5, 0.0, 2e-4, 0.25, 0.9995, 1.0, 1.5], dtype=torch.float64)
    original = box_logit(x, 1e-3, original=True)
    torch.testing.assert_close(original, _inverse_sigmoid_as_the_original(x), atol=0, rtol=0)
    expected = torch.tensor([-1, -1, 1, 1.0], dtype=torch.float64) * math.log(1e3)  # log(eps / 1), log(1 / eps)
    torch.testing.assert_close(original[[0, 1, 5, 6]], expected, atol=1e-12, rtol=0)
    assert float(original[2]) == pytest.approx(math.log(1e-3 / (1 - 2e-4)), abs=1e-12)  # only x is clamped
    transformers_style = box_logit(x, 1e-3, original=False)  # clamps x to [eps, 1 - eps] instead
    assert abs(float(transformers_style[5] - original[5]) - math.log(1 - 1e-3)) < 1e-9
    torch.testing.assert_close(box_logit(x, 1e-5), torch.special.logit(x, eps=1e-5), atol=0, rtol=0)


@torch.no_grad()
def test_original_refinement_matches_the_original_code(models) -> None:
    """With ``box_refinement="original"`` the decoder and final boxes follow the original code's loop.

    The loop below is the original ``TransformerDecoder.forward`` refinement and its detector's
    final box prediction, written out with its ``inverse_sigmoid(eps=1e-3)``; some reference boxes
    sit at or near 0 and 1, where the two arithmetics differ.
    """
    _, hf_decoder, box_head, config = models
    original = config.with_box_refinement("original")
    assert (original.box_logit_eps, original.box_logit_original) == (1e-3, True)
    decoder = Decoder(original).eval()
    decoder.load_state_dict(hf_decoder.state_dict())
    x = _alone(_inputs(config), 0)
    x["reference_points"][0, :3] = torch.tensor([[1.0, 0.5, 0.9996, 0.3], [0.0, 2e-4, 0.2, 1.0], [0.5, 0.5, 1.0, 1.0]])
    hidden, references = decoder(**x, box_heads=[box_head] * config.decoder_layers)
    boxes = predict_boxes(hidden, references, box_head, original.box_logit_eps, original=True)

    reference, output, expected = x["reference_points"], x["queries"], []
    allowed = ~x["text_padding_mask"][:, None, None, :]
    for layer in decoder.layers:
        output = layer(
            output,
            decoder.query_position(reference),
            reference[:, :, None].expand(-1, -1, 4, -1),
            x["memory"],
            None,
            x["spatial_shapes"],
            x["text"],
            allowed,
        )
        before_sigmoid = _inverse_sigmoid_as_the_original(reference)
        expected.append((box_head(decoder.norm(output)) + before_sigmoid).sigmoid())
        reference = (box_head(output) + before_sigmoid).sigmoid()
    torch.testing.assert_close(boxes[:, 0], torch.stack(expected)[:, 0], atol=1e-6, rtol=0)
    # transformers' arithmetic gives other boxes from the same weights: the test tells them apart.
    hf_boxes = predict_boxes(*hf_decoder(**x, box_heads=[box_head] * config.decoder_layers), box_head)
    assert (hf_boxes - boxes).abs().max() > 1e-3
