"""Multi-scale deformable attention's sampling and mixing, in plain PyTorch.

``ms_deform_attn`` turns every sample into its four bilinear corners, folds the attention weight
into the corner weights and reads all levels at once with a single weighted gather
(``F.embedding_bag``) from the (B * S * nH, hd) view of the values; on CUDA with triton installed
it hands over to the fused kernels (``deformable_triton``). On CPU its backward (``_WeightedGather``)
scatters the values' gradient by sorting the table rows once and gathering per row, which is
3-8x faster than ``embedding_bag``'s own dense backward (the largest single cost of a training
step). ``ms_deform_attn_reference`` is the
straightforward per-level ``grid_sample`` version (as in transformers) that it is tested against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Samples (query rows x nH x nL x nP) that ``ms_deform_attn`` handles per step. Small steps keep the
# index and weight temporaries in cache (faster on an idle machine with one or two threads) and cut
# the model's peak memory by ~170 MB at 800x1200; on oversubscribed cores, where every step's
# fork/join stalls, larger steps would be faster.
STEP_ELEMENTS = 1 << 18

_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) offsets, the order within a bag


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Samples every level at the given locations and sums the samples with the given weights.

    The straightforward version (per-level ``grid_sample``, then a weighted sum), as transformers
    computes it: the reference ``ms_deform_attn`` is tested against. Arguments and result as
    ``ms_deform_attn``; as there, half-precision values are sampled at float32 locations (the
    values are widened for the sampling) and the result has the values' dtype.
    """
    dtype = value.dtype
    value = value.to(torch.promote_types(dtype, sampling_locations.dtype))
    b, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    samples = []
    for level, (h, w) in enumerate(spatial_shapes):
        v = levels[level].permute(0, 2, 3, 1).reshape(b * n_heads, head_dim, h, w)  # (B*nH, hd, H, W)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*nH, Q, nP, 2)
        samples.append(F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(samples, dim=-2).flatten(-2)  # (B*nH, hd, Q, nL*nP)
    weights = attention_weights.transpose(1, 2).reshape(b * n_heads, 1, n_queries, n_levels * n_points)
    out = (sampled * weights.to(sampled.dtype)).sum(-1).view(b, n_heads * head_dim, n_queries)  # (B, nH*hd, Q)
    return out.transpose(1, 2).to(dtype)  # (B, Q, nH*hd)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Samples every level at the given locations and sums the samples with the given weights.

    Bilinear, zeros outside the map, pixel centres at half-integers as
    ``grid_sample(align_corners=False)`` (what ``ms_deform_attn_reference`` computes with it),
    computed as one weighted gather.

    Args:
        value: (B, S, nH, hd), the levels flattened row-major one after another, S = sum(H * W).
        spatial_shapes: (H, W) of each of the nL levels, in the order they are flattened in ``value``.
        sampling_locations: (B, Q, nH, nL, nP, 2), (x, y) in [0, 1] relative to each level's
            width and height; points outside read zeros.
        attention_weights: (B, Q, nH, nL, nP), the weight of each sample.

    Returns:
        (B, Q, nH * hd)
    """
    if value.is_cuda and _use_triton(value):  # the fused kernels when triton is installed
        from .deformable_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    b, s, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, _, _ = sampling_locations.shape
    if len(spatial_shapes) != n_levels or sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not match {n_levels} levels of {s} values in all")
    rows = b * n_queries
    if rows == 0:
        return value.new_zeros(b, n_queries, n_heads * head_dim)
    layout = _Layout.of(value, spatial_shapes, sampling_locations)
    table = value.reshape(b * s * n_heads, head_dim)  # row (b * S + pixel) * nH + head
    locations = sampling_locations.reshape(rows, layout.k, 2).transpose(1, 2)  # (rows, 2, K)
    weights = attention_weights.reshape(rows, layout.k)
    needs_grad = torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    )
    step = max(1, STEP_ELEMENTS // layout.k) if value.device.type == "cpu" else rows  # steps pay on CPU only
    outs = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        index, mixed = _bags(layout, locations[r0:r1], weights[r0:r1], r0, value.dtype, needs_grad)
        if needs_grad and value.device.type == "cpu":
            outs.append(_WeightedGather.apply(index, table, mixed))
        else:
            outs.append(F.embedding_bag(index, table, mode="sum", per_sample_weights=mixed))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(b, n_queries, n_heads * head_dim)


@dataclass(frozen=True)
class _Layout:
    """Per-sample constants of ``ms_deform_attn``, as (2, K) planes (x, y) over the K = nH * nL * nP
    samples of a query, in the dtype the index arithmetic runs in."""

    n_heads: int
    n_levels: int
    n_points: int
    n_queries: int
    rows_per_image: int  # S * nH: table rows of one image
    batch: int
    exact32: bool
    dtype: torch.dtype
    half_size: Tensor  # (2, K) half the level's width and height
    last: Tensor  # (2, K) the last column and row
    step: Tensor  # (2, K) table rows from one column / one row to the next
    offset: Tensor  # (K,) the table row of the level's first pixel for the sample's head

    @property
    def k(self) -> int:
        return self.n_heads * self.n_levels * self.n_points

    @classmethod
    def of(cls, value: Tensor, spatial_shapes: list[tuple[int, int]], sampling_locations: Tensor) -> _Layout:
        b, s, n_heads, _ = value.shape
        _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
        # Index arithmetic runs in floating point (exact for integers up to 2**24 in float32).
        exact32 = sampling_locations.dtype != torch.float64 and b * s * n_heads <= 1 << 24
        cdt = torch.float32 if exact32 else torch.float64
        dev = value.device
        k = n_heads * n_levels * n_points
        sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=cdt, device=dev).T  # (2, nL) as (W, H)
        starts = torch.tensor([0] + [h * w for h, w in spatial_shapes[:-1]], dtype=cdt, device=dev).cumsum(0)
        heads = torch.arange(n_heads, dtype=cdt, device=dev)

        def per_sample(t: Tensor) -> Tensor:  # (2, nL) -> (2, K)
            return t[:, None, :, None].expand(2, n_heads, n_levels, n_points).reshape(2, k)

        return cls(
            n_heads, n_levels, n_points, n_queries, s * n_heads, b, exact32, cdt,
            half_size=per_sample(sizes / 2),
            last=per_sample(sizes - 1),
            step=per_sample(torch.stack((torch.full_like(sizes[0], n_heads), sizes[0] * n_heads))),
            offset=(starts * n_heads + heads[:, None])[:, :, None].expand(n_heads, n_levels, n_points).reshape(k),
        )  # fmt: skip


def _bags(
    layout: _Layout, locations: Tensor, weights: Tensor, first_row: int, dtype: torch.dtype, needs_grad: bool
) -> tuple[Tensor, Tensor]:
    """The ``embedding_bag`` indices and weights of ``n`` query rows: one bag per (query, head) of
    its four corners, each over (level, point), the attention weight folded into the corner weights.

    Args:
        locations: (n, 2, K) sampling locations in [0, 1], (x, y) planes.
        weights: (n, K) attention weights.
        first_row: the index of the first of these rows among all B * Q query rows.

    Returns:
        (n * nH, 4 * nL * nP) table rows and (n * nH, 4 * nL * nP) weights.
    """
    n, cdt, dev = locations.shape[0], layout.dtype, locations.device
    zero = torch.zeros((), dtype=cdt, device=dev)
    minus_half = torch.tensor(-0.5, dtype=cdt, device=dev)
    # Pixel coordinates exactly as grid_sample computes them from the [-1, 1] grid, rounding included,
    # in planes: (n, 2, K) as (x, y).
    grid = torch.empty(n, 2, layout.k, dtype=cdt, device=dev).copy_(locations).mul_(2).sub_(1)
    pixel = torch.addcmul(minus_half, grid.add_(1), layout.half_size)
    near = pixel.detach().floor()
    far = near + 1
    w_far = pixel.sub_(near)  # bilinear weight of the far corner, per axis
    w_near = torch.rsub(w_far, 1)
    near_in = torch.clamp(near, zero, layout.last).nan_to_num_()  # a NaN location reads pixel 0 with NaN weight
    far_in = torch.clamp(far, zero, layout.last).nan_to_num_()
    # A corner outside the map is at least 1 away from its clamped copy: its weight drops to 0.
    w_near = w_near.sub_(near.sub_(near_in).abs_(), alpha=2).clamp_(min=0)
    w_far = w_far.sub_(far.sub_(far_in).abs_(), alpha=2).clamp_(min=0)
    wy = (w_near[:, 1] * weights, w_far[:, 1] * weights)  # the attention weight folded into the row weights
    wx = (w_near[:, 0], w_far[:, 0])
    near_in = near_in.mul_(layout.step)
    far_in = far_in.mul_(layout.step)
    base = layout.offset
    if layout.batch > 1:
        image = torch.arange(first_row, first_row + n, device=dev).div_(layout.n_queries, rounding_mode="floor")
        base = layout.offset + (image * layout.rows_per_image).to(cdt)[:, None]
    ry = (near_in[:, 1].add_(base), far_in[:, 1].add_(base))
    cx = (near_in[:, 0], far_in[:, 0])
    lp = layout.n_levels * layout.n_points
    shape = (n, layout.n_heads, lp)  # one bag per (query, head)
    index = torch.empty(n, layout.n_heads, 4, lp, dtype=cdt, device=dev)
    for j, (y, x) in enumerate(_CORNERS):
        torch.add(ry[y].view(shape), cx[x].view(shape), out=index[:, :, j])
    if needs_grad:  # out= records no autograd
        mixed = torch.stack([(wy[y] * wx[x]).view(shape) for y, x in _CORNERS], 2).to(dtype)
    else:
        mixed = torch.empty(n, layout.n_heads, 4, lp, dtype=dtype, device=dev)
        for j, (y, x) in enumerate(_CORNERS):
            torch.mul(wy[y].view(shape), wx[x].view(shape), out=mixed[:, :, j])
    index = index.view(n * layout.n_heads, 4 * lp).to(torch.int32 if layout.exact32 else torch.int64)
    return index, mixed.view(n * layout.n_heads, 4 * lp)


class _WeightedGather(torch.autograd.Function):
    """``F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)`` with a faster CPU
    backward for the table.

    ``embedding_bag``'s dense backward accumulates one (bag, slot) at a time into the table's
    gradient. Here the (bag, slot) pairs are sorted by table row once (a stable sort, so the
    summation order, and so the result, is the same on every run), and each table row's gradient
    is then itself a weighted ``embedding_bag`` over the output gradient's rows.
    """

    @staticmethod
    def forward(ctx: Any, index: Tensor, table: Tensor, weights: Tensor) -> Tensor:
        """index: (n, K) table rows; table: (T, hd); weights: (n, K). Returns (n, hd)."""
        ctx.save_for_backward(index, table, weights)
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:
        index, table, weights = ctx.saved_tensors
        n, k = index.shape
        flat = index.reshape(-1).long()  # (n * K,)
        grad = grad.contiguous()
        grad_table = grad_weights = None
        if ctx.needs_input_grad[1]:
            order = torch.argsort(flat, stable=True)  # (bag, slot) pairs grouped by table row
            counts = torch.bincount(flat, minlength=table.shape[0])  # (T,)
            offsets = counts.cumsum(0).sub_(counts)  # where each table row's pairs start in ``order``
            bag_of = order.div(k, rounding_mode="floor")  # the output row of each sorted pair
            grad_table = F.embedding_bag(bag_of, grad, offsets, mode="sum",
                                         per_sample_weights=weights.reshape(-1)[order])  # (T, hd)
        if ctx.needs_input_grad[2]:
            offsets = torch.arange(0, n * k, k, device=index.device)
            bag_of = torch.arange(n, device=index.device).repeat_interleave(k)
            grad_weights = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, table, flat, offsets, bag_of, 0, -1).view(n, k)  # mode 0: sum
        return None, grad_table, grad_weights


def _use_triton(value: Tensor) -> bool:
    """Whether the fused Triton kernels can take ``value`` (GDINO_NO_TRITON=1 opts out).

    Imported here, not with this module: importing triton costs CPU-only users start-up time.
    """
    from .deformable_triton import supported_head_dim, triton_available

    opted_out = os.environ.get("GDINO_NO_TRITON", "") not in ("", "0")
    return not opted_out and triton_available(value.device) and supported_head_dim(value.shape[-1])
