"""The feature enhancer and its parts against Hugging Face transformers' Grounding DINO."""

from __future__ import annotations

import pytest
import torch
from transformers import GroundingDinoConfig as HFConfig
from transformers import GroundingDinoForObjectDetection
from transformers.models.grounding_dino import modeling_grounding_dino as hf

from gdino.config import SPECIAL_TOKEN_IDS, GroundingDinoConfig
from gdino.convert import hf_to_ours
from gdino.model.deformable import MultiScaleDeformableAttention, ms_deform_attn
from gdino.model.encoder import FeatureEnhancer, encoder_reference_points
from gdino.model import fusion
from gdino.model.fusion import FusionLayer

SHAPES = [(16, 20), (8, 10), (4, 5), (2, 3)]
VALID_2ND = [(12, 15), (6, 8), (3, 4), (2, 2)]  # (rows, cols) of image 2 that are not padding
ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> tuple[GroundingDinoForObjectDetection, GroundingDinoConfig, dict[str, torch.Tensor]]:
    """A small HF model with noisy parameters, our config for it, and its state dict in our names."""
    hf_config = HFConfig(
        backbone_config=dict(
            model_type="swin", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
            out_indices=[2, 3, 4], out_features=["stage2", "stage3", "stage4"], window_size=7,
        ),
        text_config=dict(
            model_type="bert", hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
        ),
        encoder_layers=2, decoder_layers=2, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=50,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(hf_config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ours, unknown = hf_to_ours(model.state_dict())
    assert [n for n in unknown if n.startswith("model.encoder.")] == []
    return model, GroundingDinoConfig.from_hf_dict(hf_config.to_dict()), ours


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    module.load_state_dict(sub, strict=True)
    return module.eval()


def _vision_masks() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-level (B, H, W) masks, True = valid (image 2 padded at bottom/right), and (B, nL, 2) valid ratios."""
    masks = []
    for (h, w), (vh, vw) in zip(SHAPES, VALID_2ND):
        m = torch.ones(2, h, w, dtype=torch.bool)
        m[1, vh:] = False
        m[1, :, vw:] = False
        masks.append(m)
    ratios = torch.stack([_valid_ratio(m) for m in masks], 1)
    return masks, ratios


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    _, h, w = mask.shape
    return torch.stack([mask[:, 0, :].sum(1) / w, mask[:, :, 0].sum(1) / h], -1).float()  # (B, 2) as (w, h)


def _hf_shapes() -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    return shapes, torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))


def test_ms_deform_attn_matches_hf_core() -> None:
    torch.manual_seed(2)
    b, q, nh, hd, nl, npt = 2, 7, 4, 8, len(SHAPES), 3
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(b, s, nh, hd)
    locations = torch.rand(b, q, nh, nl, npt, 2) * 1.2 - 0.1  # some points fall outside the map
    weights = torch.rand(b, q, nh, nl, npt)
    shapes, starts = _hf_shapes()
    expected = hf.MultiScaleDeformableAttention()(value, shapes, SHAPES, starts, locations, weights, 64)
    out = ms_deform_attn(value, SHAPES, locations, weights)
    assert out.shape == (b, q, nh * hd)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_ms_deform_attn_bilinear_sample_by_hand() -> None:
    value = torch.arange(6.0).view(1, 6, 1, 1)  # one level 2x3: [[0, 1, 2], [3, 4, 5]]
    loc = torch.tensor([0.5, 0.5]).view(1, 1, 1, 1, 1, 2)  # map centre: pixel coords (1.0, 0.5)
    out = ms_deform_attn(value, [(2, 3)], loc, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize("coords", [2, 4])
def test_deformable_attention_matches_hf(models, coords: int) -> None:
    model, config, state = models
    theirs = model.model.encoder.layers[1].deformable_layer.self_attn
    ours = MultiScaleDeformableAttention(config.d_model, config.num_feature_levels, config.encoder_heads,
                                         config.encoder_points)  # fmt: skip
    _load(ours, state, "transformer.encoder.layers.1.self_attn.")
    torch.manual_seed(3)
    s = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 11, config.d_model), torch.randn(2, s, config.d_model)
    reference = torch.rand(2, 11, len(SHAPES), coords)
    padding = ~torch.cat([m.flatten(1) for m in _vision_masks()[0]], 1)
    shapes, starts = _hf_shapes()
    with torch.no_grad():
        expected, _ = theirs(query, attention_mask=~padding, encoder_hidden_states=value, reference_points=reference,
                             spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=starts)  # fmt: skip
        out = ours(query, reference, value, SHAPES, padding)
        unmasked = ours(query, reference, value, SHAPES, None)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(unmasked[1], out[1], atol=1e-3)  # the padding mask matters for image 2


def _fusion_pair(models) -> tuple[torch.nn.Module, FusionLayer]:
    model, config, state = models
    ours = FusionLayer(config.d_model, config.fusion_dim, config.fusion_heads, config.layer_norm_eps)
    return model.model.encoder.layers[0].fusion_layer, _load(ours, state, "transformer.encoder.fusion_layers.0.")


def test_fusion_layer_matches_hf(models) -> None:
    theirs, ours = _fusion_pair(models)
    torch.manual_seed(4)
    vision, text = torch.randn(2, 30, 64), torch.randn(2, 6, 64)
    vision_pad = torch.zeros(2, 30, dtype=torch.bool)
    vision_pad[1, 20:] = True
    text_pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    with torch.no_grad():
        (ev, _), (et, _) = theirs(vision, text, attention_mask_vision=vision_pad, attention_mask_text=text_pad)
        ov, ot = ours(vision, text, vision_pad, text_pad)
        nv, nt = ours(vision, text, None, None)
    torch.testing.assert_close(ov, ev, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(ot, et, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(nv[1], ov[1], atol=1e-4) and not torch.allclose(nt[1], ot[1], atol=1e-4)


def test_fusion_clamp_matches_hf_on_extreme_logits(models, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits spread over far more than 50000: rows far below the global maximum turn uniform."""
    theirs, ours = _fusion_pair(models)
    torch.manual_seed(5)
    vision, text = torch.randn(2, 30, 64), torch.randn(2, 6, 64)
    projections = (theirs.attn.vision_proj, ours.attn.v_proj)
    with torch.no_grad():
        for layer in projections:
            layer.weight.mul_(3e4)  # logits of about +-170000
        try:
            (ev, _), (et, _) = theirs(vision, text)
            ov, ot = ours(vision, text)
            monkeypatch.setattr(fusion, "_LOGIT_CLAMP", float("inf"))
            unclamped_v, unclamped_t = ours(vision, text)
        finally:
            for layer in projections:
                layer.weight.div_(3e4)
    torch.testing.assert_close(ov, ev, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(ot, et, atol=ATOL, rtol=1e-4)
    # The test exercises the clamp on both sides: without it the outputs differ.
    assert (unclamped_v - ov).abs().max() > 0.1 and (unclamped_t - ot).abs().max() > 0.1


def test_reference_points_match_hf() -> None:
    _, ratios = _vision_masks()
    expected = hf.GroundingDinoEncoder.get_reference_points(SHAPES, ratios, device=ratios.device)
    out = encoder_reference_points(SHAPES, ratios)
    assert out.shape == (2, sum(h * w for h, w in SHAPES), len(SHAPES), 2)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def _text_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths: (B, T) token mask (True = real), (B, T, T) self-attention, (B, T) ids."""
    input_ids = torch.tensor([
        [101, 4937, 1012, 2317, 3899, 1012, 102],  # "cat. white dog."
        [101, 3899, 1012, 102, 0, 0, 0],  # "dog." + padding
    ])  # fmt: skip
    token_mask = input_ids != 0
    self_attention, position_ids = hf.generate_masks_with_special_tokens_and_transfer_map(
        input_ids, torch.tensor(SPECIAL_TOKEN_IDS)
    )
    return token_mask, self_attention, position_ids


def test_encoder_matches_hf(models) -> None:
    model, config, state = models
    ours = _load(FeatureEnhancer(config), state, "transformer.encoder.")
    masks, ratios = _vision_masks()
    valid = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S), True = valid
    token_mask, self_attention, position_ids = _text_inputs()
    torch.manual_seed(6)
    d = config.d_model
    vision, pos = torch.randn(2, valid.shape[1], d), torch.randn(2, valid.shape[1], d)
    text = torch.randn(2, token_mask.shape[1], d)
    shapes, starts = _hf_shapes()
    with torch.no_grad():
        expected = model.model.encoder(
            vision_features=vision, vision_attention_mask=~valid, vision_position_embedding=pos,
            spatial_shapes=shapes, spatial_shapes_list=SHAPES, level_start_index=starts, valid_ratios=ratios,
            text_features=text, text_attention_mask=~token_mask, text_position_embedding=None,
            text_self_attention_masks=~self_attention, text_position_ids=position_ids, return_dict=True,
        )  # fmt: skip
        out_v, out_t = ours(vision, pos, SHAPES, ratios, ~valid, text, ~token_mask, self_attention, position_ids)
    torch.testing.assert_close(out_v, expected.last_hidden_state_vision, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_t, expected.last_hidden_state_text, atol=ATOL, rtol=0)
    assert (out_v - vision).abs().mean() > 0.1 and (out_t - text).abs().mean() > 0.1  # the layers did something
