"""SAM's ViT image encoder (ViTDet-style) and its neck.

The (B, 3, S, S) image, S = ``image_size``, is cut into ``patch_size`` patches: a (B, g, g, width)
map, g = S / patch_size (64 for the published 1024 / 16), plus a learnt absolute position
embedding. Most blocks attend within ``window_size`` windows (the map zero-padded to a multiple
of the window and cropped back after); the blocks of ``global_attn_indexes`` attend over the whole
map. Every attention adds decomposed relative positions (MViTv2): a learnt table per axis, indexed
by the query-key offset and dotted with the query. The neck (1x1 conv, norm, 3x3 conv, norm)
turns the map into the (B, prompt_dim, g, g) image embedding.

SAM-HQ also takes the output of the first global block (its "early ViT features"); the encoder
returns it when built with ``keep_early=True``.

Maps are kept as (B, H, W, C) inside the ViT so that norms and linear layers act on the last
dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam.common import LayerNorm2d, MLPBlock
from gdino.models.sam.config import SamVisionConfig


def window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """Cuts a map into non-overlapping windows, zero-padding it at the bottom and right first.

    Args:
        x: (B, H, W, C).

    Returns:
        The windows, (B * nW, window, window, C) in row-major order, and the padded (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)  # (B, nH, ws, nW_w, ws, C)
    windows = x.transpose(2, 3).reshape(-1, window, window, c)  # (B * nW, ws, ws, C)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window, window, C) -> (B, H, W, C), padding cropped."""
    (hp, wp), (h, w) = padded, size
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)  # (B, nH, nW_w, ws, ws, C)
    x = x.transpose(2, 3).reshape(b, hp, wp, -1)  # (B, Hp, Wp, C)
    if hp > h or wp > w:
        x = x[:, :h, :w].contiguous()
    return x


def relative_positions(size: int, table: Tensor) -> Tensor:
    """The table's rows for every (query, key) offset along one axis of ``size`` tokens.

    Queries and keys always have the same size in SAM (the table was built for it), so the
    original's resizing of the table and scaling of the offsets never apply.

    Args:
        table: (2 * size - 1, C), row ``size - 1 + d`` for offset ``d = query - key``.

    Returns:
        (size, size, C).
    """
    positions = torch.arange(size, device=table.device)
    offsets = positions[:, None] - positions[None, :] + (size - 1)  # (size, size), in [0, 2 * size - 2]
    return table[offsets]


def decomposed_rel_pos_bias(q: Tensor, table_h: Tensor, table_w: Tensor, height: int, width: int) -> Tensor:
    """The attention bias of decomposed relative positions: ``q . R_h[dy] + q . R_w[dx]``.

    Args:
        q: (B, nh, H * W, hd) queries (before the attention's 1 / sqrt(hd) scaling, as in the original).
        table_h, table_w: (2 * H - 1, hd) and (2 * W - 1, hd).

    Returns:
        (B, nh, H * W, H * W), to add to the attention logits.
    """
    b, nh, _, hd = q.shape
    r_h = relative_positions(height, table_h)  # (H, H, hd)
    r_w = relative_positions(width, table_w)  # (W, W, hd)
    r_q = q.reshape(b, nh, height, width, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h)  # (B, nh, H, W, H): over key rows
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w)  # (B, nh, H, W, W): over key columns
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, nh, H, W, H, W)
    return bias.reshape(b, nh, height * width, height * width)


class PatchEmbed(nn.Module):
    """A ``patch_size``-strided convolution: (B, 3, S, S) -> (B, g, g, width)."""

    def __init__(self, patch_size: int, in_channels: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, g, g, width)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) map, with decomposed relative positions.

    The original computes the softmax explicitly; here the same logits (scaled dot products plus
    the relative-position bias) go through ``F.scaled_dot_product_attention``, which agrees to
    float rounding and needs less memory on GPUs.
    """

    def __init__(self, config: SamVisionConfig, size: int) -> None:
        """``size``: the side of the maps it attends over (the window, or the grid for a global block)."""
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=config.qkv_bias)
        self.proj = nn.Linear(config.width, config.width)
        self.use_rel_pos = config.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, config.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, config.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, HW, hd)
        q, k, v = qkv.unbind(0)
        bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, h, w) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, HW, hd)
        out = out.transpose(1, 2).reshape(b, h, w, c)  # (B, H, W, C)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; ``window > 0`` attends within windows, 0 over the whole map."""

    def __init__(self, config: SamVisionConfig, window: int) -> None:
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config, window or config.grid)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLPBlock(config.width, config.mlp_dim, nn.GELU)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window:
            size = (x.shape[1], x.shape[2])
            windows, padded = window_partition(x, self.window)
            x = window_unpartition(self.attn(windows), self.window, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def _neck(width: int, out_channels: int) -> nn.Sequential:
    """1x1 conv, norm, 3x3 conv, norm (no biases): ``neck.0`` ... ``neck.3`` as in the original."""
    return nn.Sequential(
        nn.Conv2d(width, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class ImageEncoderViT(nn.Module):
    """The ViT and its neck: (B, 3, S, S) normalised pixels -> (B, out_channels, g, g)."""

    def __init__(self, config: SamVisionConfig, out_channels: int, keep_early: bool = False) -> None:
        """``keep_early``: also return the first global block's output (SAM-HQ's early features)."""
        super().__init__()
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_channels, config.width)
        self.pos_embed: nn.Parameter | None = None
        if config.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.grid, config.grid, config.width))
        self.blocks = nn.ModuleList(Block(config, config.window_of(i)) for i in range(config.depth))
        self.neck = _neck(config.width, out_channels)
        self.early_block = min(config.global_attn_indexes) if keep_early else None

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns the image embedding (B, out_channels, g, g) and, with ``keep_early``, the first
        global block's output (B, g, g, width); else None.

        Raises:
            ValueError: the image is not ``image_size`` square (the position embedding is learnt at that size).
        """
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be (B, C, {self.image_size}, {self.image_size}), got {tuple(pixel_values.shape)}"
            )
        x = self.patch_embed(pixel_values)  # (B, g, g, width)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.early_block:
                early = x
        return self.neck(x.permute(0, 3, 1, 2)), early  # (B, out_channels, g, g)
