"""Swin Transformer image backbone, as Grounding DINO uses it.

The image is cut into ``patch_size`` patches, then four stages of (shifted) window attention
follow, each but the last ending in a 2x2 patch merging. The outputs of the stages named in
``SwinConfig.out_indices`` (taken before their patch merging) are layer-normed and returned as
channels-first maps.

Any image size works: the pixels are padded at the bottom/right to a multiple of the patch size,
every block pads its map to a multiple of the window size (and crops back after the attention),
and patch merging pads odd sizes by one. Windows are shifted in every second block of a stage
even when the map is smaller than a window, as the detector was trained.

Feature maps are kept as (B, H, W, C) inside the backbone so that layer norms and linear layers
act on the last dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.grounding_dino.attention import attend
from gdino.models.grounding_dino.config import SwinConfig
from gdino.models.grounding_dino.ffn import residual_ffn

# Stem, patch-merging and output norms use torch's default eps in the reference; the blocks'
# norms use ``SwinConfig.layer_norm_eps``.
_DEFAULT_EPS = 1e-5
# Additive attention mask between tokens that a cyclic shift brought into the same window.
_SHIFT_MASK_VALUE = -100.0


def window_partition(x: Tensor, window: int) -> Tensor:
    """Cuts a map into non-overlapping windows.

    Args:
        x: (B, H, W, C) with H and W multiples of ``window``.

    Returns:
        (B, nW, window * window, C), windows in row-major order.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)  # (B, nH, ws, nW_w, ws, C)
    return x.transpose(2, 3).reshape(b, -1, window * window, c)  # (B, nW, N, C)


def window_reverse(windows: Tensor, window: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: (B, nW, window * window, C) -> (B, height, width, C)."""
    b, _, _, c = windows.shape
    x = windows.view(b, height // window, width // window, window, window, c)  # (B, nH, nW_w, ws, ws, C)
    return x.transpose(2, 3).reshape(b, height, width, c)  # (B, H, W, C)


def shift_window_mask(
    height: int, width: int, window: int, shift: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Additive mask that keeps shifted-window attention within the regions the roll joined.

    After a cyclic shift by ``shift``, each axis has three regions: ``[0, L - window)``,
    ``[L - window, L - shift)`` and ``[L - shift, L)``. Tokens of one window may only attend
    to tokens of the same (row region, column region).

    Args:
        height, width: the padded map size (multiples of ``window``).

    Returns:
        (nW, N, N) with 0 where attention is allowed and -100 elsewhere, N = window * window.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - window).long() + (rows >= height - shift).long()
    col_region = (cols >= width - window).long() + (cols >= width - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]  # (1, H, W, 1)
    region = window_partition(region, window)[0, :, :, 0]  # (nW, N)
    different = region[:, None, :] != region[:, :, None]  # (nW, N, N)
    zeros = torch.zeros(different.shape, dtype=dtype, device=device)
    return zeros.masked_fill(different, _SHIFT_MASK_VALUE)


def relative_position_index(window: int) -> Tensor:
    """Index into the (2w-1)^2 relative-position table for every pair of tokens in a window.

    Returns:
        (N, N) long tensor, N = window * window.
    """
    # Always built on the CPU (the model moves it): computing it on the meta device, where loading
    # builds the model, would import torch's Python meta kernels (~1 s).
    steps = torch.arange(window, device="cpu")
    coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection followed by a layer norm."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.embed_dim, kernel_size=p, stride=p)
        self.norm = nn.LayerNorm(config.embed_dim, eps=_DEFAULT_EPS)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H / p), ceil(W / p), C), padding the bottom/right with zeros."""
        h, w = pixel_values.shape[-2:]
        p = self.patch_size
        pixel_values = F.pad(pixel_values, (0, -w % p, 0, -h % p))
        x = self.proj(pixel_values).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        return self.norm(x)


WINDOWS_PER_STEP = 256  # windows attended at a time at inference (256 x 49 tokens)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative-position bias."""

    relative_position_index: Tensor

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def reset_buffers(self) -> None:
        """Recomputes the non-persistent index (needed after building on the meta device)."""
        self.relative_position_index = relative_position_index(self.window).to(self.relative_position_bias_table.device)

    def relative_position_bias(self) -> Tensor:
        """(nh, N, N) bias added to the attention logits of every window."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N * N, nh)
        return bias.view(n, n, -1).permute(2, 0, 1)  # (nh, N, N)

    def forward(self, windows: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        """``_attend`` over groups of windows at inference, so q, k, v of the first stage (60k
        tokens at 800x1200) never exist whole; in one piece when autograd records or off the CPU."""
        nw = windows.shape[1]
        # Steps pay on CPU (cache, page faults); on a GPU each would be a round of small kernels.
        # In one piece under torch.compile / torch.export too: steps would fix the graph's size.
        on_cpu = windows.device.type == "cpu"
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or nw <= WINDOWS_PER_STEP or not on_cpu:
            return self._attend(windows, shift_mask)
        out = torch.empty_like(windows)
        for start in range(0, nw, WINDOWS_PER_STEP):
            stop = start + WINDOWS_PER_STEP
            mask = None if shift_mask is None else shift_mask[start:stop]
            out[:, start:stop] = self._attend(windows[:, start:stop], mask)
        return out

    def _attend(self, windows: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        """Attends every token to the tokens of its window.

        Args:
            windows: (B, nW, N, C).
            shift_mask: (nW, N, N) additive mask of a shifted block, or None.

        Returns:
            (B, nW, N, C)
        """
        b, nw, n, c = windows.shape
        qkv = self.qkv(windows).view(b, nw, n, 3, self.num_heads, c // self.num_heads)  # (B, nW, N, 3, nh, hs)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, nh, N, hs)
        bias = self.relative_position_bias().to(windows.dtype)
        if shift_mask is None:
            # One bias for every window: windows join the batch, the mask broadcasts over it.
            shape, mask = (b * nw, self.num_heads, n, -1), bias[None]  # mask (1, nh, N, N)
        else:
            # The mask differs per window: windows join the heads, the mask broadcasts over B.
            mask = (bias[None] + shift_mask[:, None]).flatten(0, 1)[None]  # (1, nW * nh, N, N)
            shape = (b, nw * self.num_heads, n, -1)
        q, k, v = (t.reshape(shape) for t in (q, k, v))  # (B', h', N, hs)
        out = attend(q, k, v, mask)
        out = out.view(b, nw, self.num_heads, n, -1).transpose(2, 3).reshape(b, nw, n, c)  # (B, nW, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    """Two linear layers with a GELU between."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)"""
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted) window attention and MLP, both residual."""

    def __init__(self, config: SwinConfig, dim: int, num_heads: int, shift: int) -> None:
        super().__init__()
        self.window = config.window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = WindowAttention(dim, num_heads, config.window_size)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio))

    def _window_attention(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to whole windows, shift, attend, undo both."""
        _, h, w, _ = x.shape
        ws, s = self.window, self.shift
        x = F.pad(x, (0, 0, 0, -w % ws, 0, -h % ws))  # (B, Hp, Wp, C)
        hp, wp = x.shape[1:3]
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = self.attn(window_partition(x, ws), shift_mask)  # (B, nW, N, C)
        x = window_reverse(x, ws, hp, wp)  # (B, Hp, Wp, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x[:, :h, :w]

    def forward(self, x: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C). ``shift_mask`` (nW, N, N) is used by shifted blocks only."""
        x = x + self._window_attention(self.norm1(x), shift_mask if self.shift else None)
        return residual_ffn(self.norm2(x), self.mlp.fc1, self.mlp.fc2, F.gelu, residual=x)


class PatchMerging(nn.Module):
    """Concatenates each 2x2 neighbourhood and halves the channels: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=_DEFAULT_EPS)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Odd sizes are padded at the bottom/right: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        _, h, w, _ = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        b, h, w, c = x.shape
        x = x.view(b, h // 2, 2, w // 2, 2, c)  # (B, H/2, row, W/2, col, C)
        # Channel groups ordered (row, col) = (0, 0), (1, 0), (0, 1), (1, 1), as in the checkpoint.
        x = x.permute(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)  # (B, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks, every second one shifted by half a window, then an optional patch merging."""

    def __init__(self, config: SwinConfig, stage: int, downsample: bool) -> None:
        super().__init__()
        dim = config.stage_dim(stage)
        self.window = config.window_size
        self.shift = config.window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(config, dim, config.num_heads[stage], shift=self.shift if j % 2 else 0)
            for j in range(config.depths[stage])
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def _shift_mask(self, x: Tensor) -> Tensor | None:
        """The shifted blocks' (nW, N, N) mask for this map size; None if no block is shifted."""
        if len(self.blocks) < 2 or not self.shift:
            return None
        ws = self.window
        # Rounded up with non-negative operands: an exported floor division of a negative number
        # becomes ONNX's Div, which truncates (the mask then had too few windows).
        hp, wp = (x.shape[1] + ws - 1) // ws * ws, (x.shape[2] + ws - 1) // ws * ws
        return shift_window_mask(hp, wp, ws, self.shift, x.dtype, x.device)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, H, W, C) -> (this stage's output (B, H, W, C), the next stage's input)."""
        shift_mask = self._shift_mask(x)
        for block in self.blocks:
            x = block(x, shift_mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinBackbone(nn.Module):
    """Swin Transformer returning the normed outputs of the stages in ``config.out_indices``."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.out_indices = tuple(config.out_indices)
        num_stages = len(config.depths)
        self.patch_embed = PatchEmbed(config)
        self.layers = nn.ModuleList(SwinStage(config, i, downsample=i < num_stages - 1) for i in range(num_stages))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(config.stage_dim(i), eps=_DEFAULT_EPS))

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self.config.out_channels

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """Runs the backbone.

        Args:
            pixel_values: (B, C_in, H, W), any H and W.

        Returns:
            One (B, C_k, H_k, W_k) map per stage k in ``out_indices``, C_k = embed_dim * 2^k and
            H_k = ceil(H / (patch_size * 2^k)) (likewise W_k).
        """
        x = self.patch_embed(pixel_values)  # (B, H/4, W/4, C)
        outputs = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x)
            if i in self.out_indices:
                norm = getattr(self, f"norm{i}")
                outputs.append(norm(out).permute(0, 3, 1, 2).contiguous())  # (B, C_k, H_k, W_k)
            if i >= max(self.out_indices):
                break
        return outputs
