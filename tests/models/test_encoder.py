"""The feature enhancer and its parts against Hugging Face transformers' Grounding DINO."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import GroundingDinoForObjectDetection
from transformers.models.grounding_dino import modeling_grounding_dino as hf

from gdino.checkpoint.convert import hf_to_ours
from gdino.models.grounding_dino import fusion
from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS, GroundingDinoConfig
from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention, ms_deform_attn
from gdino.models.grounding_dino.encoder import FeatureEnhancer, encoder_reference_points
from gdino.models.grounding_dino.fusion import FusionLayer
from reference import noised_reference, small_reference_config

SHAPES = [(16, 20), (8, 10), (4, 5), (2, 3)]
VALID_2ND = [(12, 15), (6, 8), (3, 4), (2, 2)]  # (rows, cols) of image 2 that are not padding
ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> tuple[GroundingDinoForObjectDetection, GroundingDinoConfig, dict[str, torch.Tensor]]:
    """A small HF model with noisy parameters, our config for it, and its state dict in our names."""
    # transformers' default 8 heads, as the published model
    hf_config = small_reference_config(encoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=8)
    model = noised_reference(hf_config, noise=0.1)
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
    ours = MultiScaleDeformableAttention(
        config.d_model, config.num_feature_levels, config.encoder_heads, config.encoder_points
    )
    _load(ours, state, "transformer.encoder.layers.1.self_attn.")
    torch.manual_seed(3)
    s = sum(h * w for h, w in SHAPES)
    query, value = torch.randn(2, 11, config.d_model), torch.randn(2, s, config.d_model)
    reference = torch.rand(2, 11, len(SHAPES), coords)
    padding = ~torch.cat([m.flatten(1) for m in _vision_masks()[0]], 1)
    shapes, starts = _hf_shapes()
    with torch.no_grad():
        expected, _ = theirs(
            query,
            attention_mask=~padding,
            encoder_hidden_states=value,
            reference_points=reference,
            spatial_shapes=shapes,
            spatial_shapes_list=SHAPES,
            level_start_index=starts,
        )
        out = ours(query, reference, value, SHAPES, padding)
        unmasked = ours(query, reference, value, SHAPES, None)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(unmasked[1], out[1], atol=1e-3)  # the padding mask matters for image 2


def _fusion_pair(models) -> tuple[torch.nn.Module, FusionLayer]:
    model, config, state = models
    ours = FusionLayer(config.d_model, config.fusion_dim, config.fusion_heads, config.layer_norm_eps)
    return model.model.encoder.layers[0].fusion_layer, _load(ours, state, "transformer.encoder.fusion_layers.0.")


def _fusion_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded (2, 30, 64) image and (2, 6, 64) text tokens; image 1 and text 1 partly padding."""
    torch.manual_seed(4)
    vision, text = torch.randn(2, 30, 64), torch.randn(2, 6, 64)
    vision_pad = torch.zeros(2, 30, dtype=torch.bool)
    vision_pad[1, 20:] = True
    text_pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    return vision, text, vision_pad, text_pad


def test_fusion_layer_matches_hf(models) -> None:
    theirs, ours = _fusion_pair(models)
    vision, text, vision_pad, text_pad = _fusion_inputs()
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


def _bi_attention_reference(
    attn: fusion.BiAttention,
    vision: torch.Tensor,
    text: torch.Tensor,
    vision_padding_mask: torch.Tensor | None,
    text_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bi-attention computed as written (as transformers does): every image token widened to E."""

    def heads(x: torch.Tensor) -> torch.Tensor:
        b, n, e = x.shape
        return x.view(b, n, attn.num_heads, e // attn.num_heads).transpose(1, 2)  # (B, h, N, E/h)

    def merge(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)  # (B, N, E)

    q = heads(attn.v_proj(vision) * attn.scale)  # (B, h, S, E/h)
    k = heads(attn.l_proj(text))  # (B, h, T, E/h)
    logits = q @ k.transpose(-1, -2)  # (B, h, S, T)
    logits = (logits - logits.max()).clamp(-fusion._LOGIT_CLAMP, fusion._LOGIT_CLAMP)
    text_logits = logits.transpose(-1, -2)  # (B, h, T, S)
    text_logits = (text_logits - text_logits.amax(-1, keepdim=True)).clamp(-fusion._LOGIT_CLAMP, fusion._LOGIT_CLAMP)
    if vision_padding_mask is not None:
        text_logits = text_logits.masked_fill(vision_padding_mask[:, None, None, :], float("-inf"))
    if text_padding_mask is not None:
        logits = logits.masked_fill(text_padding_mask[:, None, None, :], float("-inf"))
    vision_out = logits.softmax(-1) @ heads(attn.values_l_proj(text))  # (B, h, S, E/h)
    text_out = text_logits.softmax(-1) @ heads(attn.values_v_proj(vision))  # (B, h, T, E/h)
    return attn.out_v_proj(merge(vision_out)), attn.out_l_proj(merge(text_out))


def _fusion_reference(
    layer: FusionLayer,
    vision: torch.Tensor,
    text: torch.Tensor,
    vision_padding_mask: torch.Tensor | None = None,
    text_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`FusionLayer.forward` with the straightforward bi-attention."""
    vision, text = layer.layer_norm_v(vision), layer.layer_norm_l(text)
    delta_v, delta_l = _bi_attention_reference(layer.attn, vision, text, vision_padding_mask, text_padding_mask)
    return vision + layer.gamma_v * delta_v, text + layer.gamma_l * delta_l


REAL_SHAPES = [(40, 56), (20, 28), (10, 14), (5, 7)]  # S = 2975 image tokens over 4 levels
REAL_VALID_2ND = [(30, 41), (15, 21), (8, 11), (4, 6)]  # image 2 padded at the bottom/right


def _realistic_fusion() -> tuple[FusionLayer, tuple[torch.Tensor, ...]]:
    """The real widths (D=256, E=1024, 4 heads), noisy parameters; image 2 and prompt 2 padded."""
    torch.manual_seed(7)
    layer = FusionLayer(256, 1024, 4).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
        for proj in (layer.attn.v_proj, layer.attn.l_proj):
            proj.weight.mul_(2.0)  # logits of a few units: peaked attention
        layer.gamma_v.copy_(1 + 0.2 * torch.randn(256))  # make the attention visible in the output
        layer.gamma_l.copy_(1 + 0.2 * torch.randn(256))
    s = sum(h * w for h, w in REAL_SHAPES)
    vision, text = torch.randn(2, s, 256) * 3 + 1, torch.randn(2, 12, 256)
    valid = []
    for (h, w), (vh, vw) in zip(REAL_SHAPES, REAL_VALID_2ND):
        m = torch.ones(2, h, w, dtype=torch.bool)
        m[1, vh:] = False
        m[1, :, vw:] = False
        valid.append(m.flatten(1))
    vision_pad = ~torch.cat(valid, 1)  # (2, S)
    text_pad = torch.zeros(2, 12, dtype=torch.bool)
    text_pad[1, 7:] = True
    return layer, (vision, text, vision_pad, text_pad)


@pytest.fixture(scope="module")
def realistic() -> tuple[FusionLayer, tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]:
    """The layer, its inputs and the reference outputs in float64."""
    layer, inputs = _realistic_fusion()
    layer64 = _to(layer, torch.float64)
    with torch.no_grad():
        expected = _fusion_reference(layer64, *_inputs_to(inputs, torch.float64))
    return layer, inputs, expected


def _to(layer: FusionLayer, dtype: torch.dtype) -> FusionLayer:
    copy = FusionLayer(256, 1024, 4).eval()
    copy.load_state_dict(layer.state_dict())
    return copy.to(dtype)


def _inputs_to(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def test_fusion_matches_straightforward_at_real_widths_fp32(realistic) -> None:
    layer, inputs, expected = realistic
    with torch.no_grad():
        out_v, out_t = layer(*inputs)
        ref_v, ref_t = _fusion_reference(layer, *inputs)
        unmasked_v, unmasked_t = layer(inputs[0], inputs[1], None, None)
    torch.testing.assert_close(out_v, ref_v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_t, ref_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_v, expected[0].float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_t, expected[1].float(), atol=1e-4, rtol=1e-4)
    # Both masks matter (image 2, prompt 2), and the attention is visible in the output.
    assert (unmasked_v[1] - out_v[1]).abs().max() > 1e-2 and (unmasked_t[1] - out_t[1]).abs().max() > 1e-2
    ln_v, ln_t = layer.layer_norm_v(inputs[0]), layer.layer_norm_l(inputs[1])
    assert (out_v - ln_v).abs().mean() > 1e-2 and (out_t - ln_t).abs().mean() > 1e-2


def test_fusion_matches_straightforward_at_real_widths_fp64(realistic) -> None:
    layer, inputs, expected = realistic
    with torch.no_grad():
        out_v, out_t = _to(layer, torch.float64)(*_inputs_to(inputs, torch.float64))
    torch.testing.assert_close(out_v, expected[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_t, expected[1], atol=1e-10, rtol=1e-10)


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_fusion_bf16_is_as_accurate_as_straightforward(realistic) -> None:
    layer, inputs, expected = realistic
    layer16, inputs16 = _to(layer, torch.bfloat16), _inputs_to(inputs, torch.bfloat16)
    with torch.no_grad():
        out = layer16(*inputs16)
        ref = _fusion_reference(layer16, *inputs16)
    for o, r, e in zip(out, ref, expected):
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
        err, ref_err = (o.double() - e).abs(), (r.double() - e).abs()
        torch.testing.assert_close(o.double(), e, atol=0.1, rtol=0.05)
        assert err.mean() <= 1.5 * ref_err.mean() + 1e-3, (err.mean(), ref_err.mean())


class _LargestTensor(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_fusion_never_widens_image_tokens(realistic) -> None:
    """No (S, E) tensor: the largest per-image intermediate is the (S, D) tokens (h * T = 48 < D here)."""
    layer, inputs, _ = realistic
    b, s, d = inputs[0].shape
    with torch.no_grad(), _LargestTensor() as mode:
        layer(*inputs)
    assert mode.largest == b * s * d
    with torch.no_grad(), _LargestTensor() as mode:
        _fusion_reference(layer, *inputs)
    assert mode.largest == b * s * 1024  # the check would see it


@pytest.mark.parametrize("masks", ["none", "vision", "text"])
def test_fusion_optional_masks_match_straightforward(realistic, masks: str) -> None:
    layer, (vision, text, vision_pad, text_pad), _ = realistic
    vision, text, vision_pad = vision[:, :500], text[:, :9], vision_pad[:, :500]
    vision_pad = vision_pad if masks == "vision" else None
    text_pad = text_pad[:, :9] if masks == "text" else None
    with torch.no_grad():
        out = layer(vision, text, vision_pad, text_pad)
        ref = _fusion_reference(layer, vision, text, vision_pad, text_pad)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


def test_fusion_straightforward_reference_matches_hf(models) -> None:
    """The reference used above is itself transformers' computation."""
    theirs, ours = _fusion_pair(models)
    vision, text, vision_pad, text_pad = _fusion_inputs()
    with torch.no_grad():
        (ev, _), (et, _) = theirs.attn(vision, text, vision_attention_mask=vision_pad, text_attention_mask=text_pad)
        rv, rt = _bi_attention_reference(ours.attn, vision, text, vision_pad, text_pad)
        ov, ot = ours.attn(vision, text, vision_pad, text_pad)
    for out in ((rv, rt), (ov, ot)):
        torch.testing.assert_close(out[0], ev, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1], et, atol=1e-5, rtol=1e-4)


def test_reference_points_match_hf() -> None:
    _, ratios = _vision_masks()
    expected = hf.GroundingDinoEncoder.get_reference_points(SHAPES, ratios, device=ratios.device)
    out = encoder_reference_points(SHAPES, ratios)
    assert out.shape == (2, sum(h * w for h, w in SHAPES), len(SHAPES), 2)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def _text_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two prompts of different lengths: (B, T) token mask (True = real), (B, T, T) self-attention, (B, T) ids."""
    input_ids = torch.tensor(
        [
            [101, 4937, 1012, 2317, 3899, 1012, 102],  # "cat. white dog."
            [101, 3899, 1012, 102, 0, 0, 0],  # "dog." + padding
        ]
    )
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
            vision_features=vision,
            vision_attention_mask=~valid,
            vision_position_embedding=pos,
            spatial_shapes=shapes,
            spatial_shapes_list=SHAPES,
            level_start_index=starts,
            valid_ratios=ratios,
            text_features=text,
            text_attention_mask=~token_mask,
            text_position_embedding=None,
            text_self_attention_masks=~self_attention,
            text_position_ids=position_ids,
            return_dict=True,
        )
        out_v, out_t = ours(vision, pos, SHAPES, ratios, ~valid, text, ~token_mask, self_attention, position_ids)
    torch.testing.assert_close(out_v, expected.last_hidden_state_vision, atol=ATOL, rtol=0)
    torch.testing.assert_close(out_t, expected.last_hidden_state_text, atol=ATOL, rtol=0)
    assert (out_v - vision).abs().mean() > 0.1 and (out_t - text).abs().mean() > 0.1  # the layers did something
