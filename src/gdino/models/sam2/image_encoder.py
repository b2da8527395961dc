"""The image encoder: the Hiera trunk and the FPN neck over it.

The neck projects each of the trunk's four stage outputs to ``d_model`` channels with a 1x1
convolution and, at ``fpn_top_down_levels`` (levels 2 and 3, counted from the highest resolution),
adds the next-lower level upsampled 2x (nearest). The lowest level (stride 32) is dropped after
feeding level 2 (the original's ``scalp=1``), leaving the three maps the mask decoder reads:
strides 4 and 8 (the high-resolution features) and 16 (the image embedding).

The original's neck also computes a sine position encoding for every level; only the video
model's memory attention reads it, so the image model leaves it out.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.hiera import Hiera


class FpnNeck(nn.Module):
    """``convs[i]`` is the lateral projection of trunk level ``n - i`` (lowest resolution first, as
    ``backbone_channel_list`` runs), each a one-module ``Sequential`` named ``conv`` (the original's keys)."""

    def __init__(self, d_model: int, backbone_channel_list: list[int], top_down_levels: tuple[int, ...]) -> None:
        super().__init__()
        self.top_down_levels = top_down_levels
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, d_model, kernel_size=1)))
            for channels in backbone_channel_list
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        """The trunk's levels (highest resolution first) -> the neck's, (B, d_model, H_i, W_i), in the same order."""
        n = len(self.convs) - 1
        out: list[Tensor] = []
        previous: Tensor | None = None
        for i in range(n, -1, -1):  # top-down: from the lowest resolution up
            lateral = self.convs[n - i](xs[i])
            if i in self.top_down_levels and previous is not None:
                # Both references upsample in float32; the original leaves the sum in float32 (its
                # modules run under autocast), transformers casts it back, as here (a no-op in float32).
                top_down = F.interpolate(previous.to(torch.float32), scale_factor=2.0, mode="nearest")
                previous = lateral + top_down.to(lateral.dtype)
            else:
                previous = lateral
            out.insert(0, previous)
        return out


class ImageEncoder(nn.Module):
    """(B, 3, S, S) pixels -> the three feature maps the decoder reads, (B, d_model, S/4, S/4),
    (B, d_model, S/8, S/8) and (B, d_model, S/16, S/16)."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        self.trunk = Hiera(config.hiera)
        self.neck = FpnNeck(config.d_model, list(reversed(config.hiera.embed_dims)), config.fpn_top_down_levels)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        return self.neck(self.trunk(pixel_values))[:-1]  # the stride-32 level only fed the one above it
