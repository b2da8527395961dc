"""The Swin backbone and the sine position embeddings against Hugging Face transformers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd

from gdino.checkpoint.convert import hf_to_ours
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.position import coordinate_sine_embedding, sine_position_embedding
from gdino.models.grounding_dino.swin import SwinBackbone, shift_window_mask
from reference import noised_reference

try:  # transformers >= 5 renames weights in memory; save_pretrained writes the published names.
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:  # transformers 4: in-memory names are the published names

    def revert_weight_conversion(model, state_dict):  # type: ignore[no-redef]
        return state_dict


def _hf_config() -> transformers.GroundingDinoConfig:
    # depths 2 in every stage: each stage has a shifted block, so the shift mask is exercised at
    # every resolution (including maps smaller than a window).
    return transformers.GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 32,
            "depths": [2, 2, 2, 2],
            "num_heads": [1, 2, 2, 4],
            "out_indices": [2, 3, 4],
            "out_features": ["stage2", "stage3", "stage4"],
            "window_size": 7,
        },
        text_config={
            "model_type": "bert",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        encoder_layers=1,
        decoder_layers=2,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=50,
    )


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, SwinBackbone]:
    """(HF Swin backbone, ours) holding the same noised weights."""
    hf_config = _hf_config()
    hf = noised_reference(hf_config, noise=0.1)  # HF zeroes e.g. the relative-position tables
    converted, unknown = hf_to_ours(revert_weight_conversion(hf, hf.state_dict()))
    assert unknown == []
    ours = SwinBackbone(GroundingDinoConfig.from_hf_dict(hf_config.to_dict()).swin).eval()
    prefix = "backbone."
    ours.load_state_dict({k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}, strict=True)
    return hf.model.backbone.conv_encoder.model, ours


@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (2, 3, 75, 131), (1, 3, 224, 224), (1, 3, 17, 9)])
def test_backbone_matches_hf(models, shape):
    hf, ours = models
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixels).feature_maps
        got = ours(pixels)
    assert len(got) == len(expected) == 3
    for k, (e, g) in enumerate(zip(expected, got)):
        assert g.shape == e.shape
        assert g.shape[1] == ours.out_channels[k]
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)


def test_backbone_follows_input_dtype(models):
    hf, ours = models
    pixels = torch.randn(1, 3, 23, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hf64, ours64 = hf.double(), ours.double()
    try:
        with torch.no_grad():
            expected = hf64(pixels).feature_maps
            got = ours64(pixels)
    finally:
        hf.float(), ours.float()
    for e, g in zip(expected, got):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_relative_position_index_is_recomputed_not_stored(models):
    hf, ours = models
    assert not any("relative_position_index" in k for k in ours.state_dict())
    hf_layer = hf.swin.encoder.layers[2].blocks[1].attention
    hf_index = next(b for n, b in hf_layer.named_buffers() if n.endswith("relative_position_index"))
    ours_index = ours.layers[2].blocks[1].attn.relative_position_index
    assert torch.equal(ours_index.view(-1), hf_index.view(-1))


def test_shift_window_mask_separates_rolled_regions():
    mask = shift_window_mask(14, 7, window=7, shift=3, dtype=torch.float32, device=torch.device("cpu"))
    assert mask.shape == (2, 49, 49)
    # Columns 0-3 and 4-6 are different column regions (the roll joined them).
    assert mask[0, 0, 3] == 0  # tokens (0, 0) and (0, 3) of window 0
    assert mask[0, 0, 5] == -100  # tokens (0, 0) and (0, 5)
    # Window 1 (rows 7-13): rows 7-10 and 11-13 are different row regions.
    assert mask[1, 0, 3 * 7] == 0  # rows 7 and 10, same column
    assert mask[1, 0, 4 * 7] == -100  # rows 7 and 11
    assert torch.equal(mask, mask.transpose(1, 2))


def test_sine_position_embedding_matches_hf():
    config = _hf_config()
    mask = torch.ones(2, 9, 13, dtype=torch.bool)
    mask[0, 6:, :] = False  # padding at the bottom
    mask[1, :, 10:] = False  # and at the right
    mask[1, 8:, :] = False
    expected = hf_gd.GroundingDinoSinePositionEmbedding(config)(torch.zeros(2, 1, 9, 13), mask)
    got = sine_position_embedding(mask, config.d_model // 2, config.positional_embedding_temperature)
    assert got.shape == (2, config.d_model, 9, 13)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Padding changes the normalization of the valid part.
    assert not torch.allclose(got[0, :, :6], got[1, :, :6])


@pytest.mark.parametrize(
    "shape,num_feats,dtype",
    [
        ((2, 7, 1), 64, torch.float32),
        ((2, 5, 2), 16, torch.float32),
        ((2, 5, 4), 32, torch.float32),
        ((3, 4), 128, torch.float32),
        ((2, 5, 4), 32, torch.float16),
    ],
)
def test_coordinate_sine_embedding_matches_hf(shape, num_feats, dtype):
    coords = torch.rand(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    if shape[-1] == 1:  # text position ids
        coords = torch.arange(shape[1], dtype=dtype).expand(shape[0], -1)[..., None]
    expected = hf_gd.encode_sinusoidal_position_embedding(coords, num_pos_feats=num_feats)
    got = coordinate_sine_embedding(coords, num_feats)
    assert got.shape == (*shape[:-1], shape[-1] * num_feats)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if shape[-1] >= 2:  # the first block embeds y, the second x
        torch.testing.assert_close(got[..., :num_feats], coordinate_sine_embedding(coords[..., 1:2], num_feats))


def test_windows_in_steps_equal_one_piece(monkeypatch):
    """At inference the window attention runs over groups of windows; the result is the same."""
    import gdino.models.grounding_dino.swin as swin

    torch.manual_seed(0)
    attn = swin.WindowAttention(32, 2, 7).eval()
    windows = torch.randn(2, 11, 49, 32)
    shift = swin.shift_window_mask(21, 35, 7, 3, torch.float32, torch.device("cpu"))  # (15, 49, 49)
    with torch.no_grad():
        for mask, n in ((None, 11), (shift[:11], 11)):
            whole = attn._attend(windows[:, :n], mask)
            monkeypatch.setattr(swin, "WINDOWS_PER_STEP", 4)
            torch.testing.assert_close(attn(windows[:, :n], mask), whole, atol=1e-6, rtol=0)
            monkeypatch.setattr(swin, "WINDOWS_PER_STEP", 256)
