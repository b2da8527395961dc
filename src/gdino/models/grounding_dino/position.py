"""Sine position embeddings: of image feature maps, and of scalar coordinates.

Both follow DETR: a value ``v`` becomes ``num_feats`` features ``sin(v / t_0), cos(v / t_0),
sin(v / t_1), cos(v / t_1), ...`` with ``t_i = temperature ** (2 * (i // 2) / num_feats)``, and
the embedding of a point lists its y features before its x features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SCALE = 2 * math.pi
_EPS = 1e-6


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    """(num_feats,) float32 divisors ``temperature ** (2 * (i // 2) / num_feats)``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """(..., F) angles -> (..., F): sin of the even features, cos of the odd, interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_embedding(mask: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Position embedding of an image feature map, normalized to the valid (unpadded) region.

    Positions are counted along the valid pixels only and scaled so that the last valid row
    (column) sits at 2 pi.

    Args:
        mask: (B, H, W) bool, True where the pixel is part of the image, False for padding.
        num_feats: features per axis.
        temperature: frequency base.

    Returns:
        (B, 2 * num_feats, H, W) float32: y features, then x features.
    """
    y = mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
    x = mask.cumsum(2, dtype=torch.float32)  # (B, H, W)
    y = y / (y[:, -1:, :] + _EPS) * _SCALE
    x = x / (x[:, :, -1:] + _EPS) * _SCALE
    dim_t = _frequencies(num_feats, temperature, mask.device)
    pos_y = _interleave_sin_cos(y[..., None] / dim_t)  # (B, H, W, F)
    pos_x = _interleave_sin_cos(x[..., None] / dim_t)  # (B, H, W, F)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


def coordinate_sine_embedding(coords: Tensor, num_feats: int = 128, temperature: float = 10000) -> Tensor:
    """Embeds each of the last dimension's ``n`` coordinates with ``num_feats`` sine features.

    Used for text position ids (``n = 1``) and for the decoder's query boxes (``n = 4``, given as
    ``(cx, cy, w, h)`` in [0, 1]). As in DETR the first two coordinates swap places, so a box is
    embedded as ``(y, x, w, h)``.

    Args:
        coords: (..., n) in the input's dtype.
        num_feats: features per coordinate.
        temperature: frequency base.

    Returns:
        (..., n * num_feats) in ``coords``' dtype.
    """
    dim_t = _frequencies(num_feats, temperature, coords.device)
    emb = _interleave_sin_cos(coords[..., None] * _SCALE / dim_t)  # (..., n, F)
    if coords.shape[-1] >= 2:
        emb = torch.cat((emb[..., 1:2, :], emb[..., 0:1, :], emb[..., 2:, :]), dim=-2)  # (..., n, F), x <-> y
    return emb.flatten(-2).to(coords.dtype)  # (..., n * F)
