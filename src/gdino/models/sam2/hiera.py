"""Hiera, SAM 2's image trunk: four stages of attention blocks over a (B, H, W, C) map.

Most blocks attend within non-overlapping windows; a few (``global_att_blocks``) attend over the
whole map. The first block of each later stage widens the channels and pools its queries 2x2
(max pooling), halving the resolution, so the four stage outputs have strides 4, 8, 16 and 32.
A stage's first block still works in the previous stage's windows (the original's "lags by a
block"). The input gets a learnt position embedding: a background table resized bicubically to the
patch grid plus a window-sized table tiled over it (https://arxiv.org/abs/2311.05613).

The original (``sam2/modeling/backbones/hieradet.py``) and transformers' ``Sam2HieraDetModel``
compute the same; the parameter names here are the original's. (Both fail on a global-attention
block that also pools, which no published size has; here it pools the whole map's queries.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam2.common import MLP
from gdino.models.sam2.config import HieraConfig


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * n_windows, window, window, C), zero-padding H and W up to multiples of
    ``window``; also returns the padded (H, W)."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """The inverse of ``window_partition``: (B * n_windows, window, window, C) -> (B, H, W, C), padding cut off."""
    (hp, wp), (h, w) = padded, size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)  # (B, Hp, Wp, C)
    return x[:, :h, :w]


def pool(x: Tensor, stride: tuple[int, int]) -> Tensor:
    """2D max pooling of a (B, H, W, C) map, kernel = stride (floor: an odd row or column is dropped)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, dim) map (or its windows), to ``dim_out`` channels;
    with ``q_stride`` the queries are pooled, so the output is (B, H / s, W / s, dim_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)  # (B, HW, 3, heads, head_dim)
        q, k, v = qkv.unbind(2)  # each (B, HW, heads, head_dim)
        if self.q_stride is not None:
            q = pool(q.reshape(b, h, w, -1), self.q_stride)  # (B, H', W', heads * head_dim)
            h, w = q.shape[1:3]
            q = q.reshape(b, h * w, self.num_heads, -1)  # (B, H'W', heads, head_dim)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x.transpose(1, 2).reshape(b, h, w, -1)  # (B, H', W', dim_out)
        return self.proj(x)


@dataclass(frozen=True)
class BlockSpec:
    """One block's shape: widths in and out, heads, window side (0: global attention), query pooling."""

    dim: int
    dim_out: int
    num_heads: int
    window: int
    q_stride: tuple[int, int] | None


def block_specs(c: HieraConfig) -> list[BlockSpec]:
    """Every block of the trunk, in order (the original's ``Hiera.__init__`` loop)."""
    specs: list[BlockSpec] = []
    for stage, blocks in enumerate(c.stages):
        for j in range(blocks):
            first = stage > 0 and j == 0  # widens, pools (in the first q_pool stage changes), keeps the last window
            before = stage - 1 if first else stage
            window = 0 if len(specs) in c.global_att_blocks else c.window_spec[before]
            q_stride = c.q_stride if first and stage <= c.q_pool else None
            specs.append(BlockSpec(c.embed_dims[before], c.embed_dims[stage], c.num_heads[stage], window, q_stride))
    return specs


class MultiScaleBlock(nn.Module):
    """Pre-norm (windowed) attention and MLP, with a projected and pooled shortcut where the width changes."""

    def __init__(self, spec: BlockSpec, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.window = spec.window
        self.q_stride = spec.q_stride
        self.norm1 = nn.LayerNorm(spec.dim, eps=eps)
        self.attn = MultiScaleAttention(spec.dim, spec.dim_out, spec.num_heads, spec.q_stride)
        self.norm2 = nn.LayerNorm(spec.dim_out, eps=eps)
        self.mlp = MLP(spec.dim_out, int(spec.dim_out * mlp_ratio), spec.dim_out, 2, activation=nn.GELU)
        self.proj = nn.Linear(spec.dim, spec.dim_out) if spec.dim != spec.dim_out else None

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x  # (B, H, W, dim)
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            if self.q_stride is not None:
                shortcut = pool(shortcut, self.q_stride)  # (B, H', W', dim_out)
        if self.window > 0:
            windows, _ = window_partition(x, self.window)
            x = self.attn(windows)
            window = self.window // self.q_stride[0] if self.q_stride is not None else self.window
            h, w = shortcut.shape[1:3]  # the windows were pooled as the map was
            x = window_unpartition(x, window, (h + -h % window, w + -w % window), (h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The stem: a strided convolution, (B, 3, S, S) -> (B, S/4, S/4, C)."""

    def __init__(self, c: HieraConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            c.in_channels, c.embed_dims[0], c.patch_kernel_size, stride=c.patch_stride, padding=c.patch_padding
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """The trunk: (B, 3, S, S) pixels -> the four stage outputs, (B, C_i, S / 2^(i+2), S / 2^(i+2)),
    highest resolution first."""

    def __init__(self, c: HieraConfig) -> None:
        super().__init__()
        self.stage_ends = c.stage_ends
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.embed_dims[0], *c.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, c.embed_dims[0], c.window_spec[0], c.window_spec[0]))
        self.blocks = nn.ModuleList(MultiScaleBlock(s, c.mlp_ratio, c.layer_norm_eps) for s in block_specs(c))

    def position_embedding(self, h: int, w: int) -> Tensor:
        """(1, h, w, C): the background table resized to the grid, plus the window table tiled over it."""
        window = self.pos_embed_window
        pos = F.interpolate(self.pos_embed, size=(h, w), mode="bicubic")  # (1, C, h, w)
        pos = pos + window.tile(1, 1, h // window.shape[-2], w // window.shape[-1])
        return pos.permute(0, 2, 3, 1)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        x = self.patch_embed(pixel_values)  # (B, H, W, C)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))  # (B, C_i, H_i, W_i)
        return outputs
