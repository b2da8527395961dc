"""Multi-scale deformable attention's sampling and mixing, in plain PyTorch.

``ms_deform_attn`` turns every sample into its four bilinear corners, folds the attention weight
into the corner weights and reads all levels at once with a single weighted gather
(``F.embedding_bag``) from the (B * S * nH, hd) view of the values; on CUDA with triton installed
it hands over to the fused kernels (``deformable_triton``). Under autograd on CPU each step is one
``_SampledGather``: it keeps only the locations and weights and recomputes the corners in the
backward, and scatters the values' gradient by sorting the table rows once and gathering per row,
3-8x faster than ``embedding_bag``'s own dense backward (once the largest single cost of a
training step). ``ms_deform_attn_reference`` is the
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
        from gdino.models.grounding_dino.ops.deformable_triton import ms_deform_attn_triton

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
    # split, not slices: under autograd each slice's backward would zero-fill a gradient of the whole.
    steps = zip(range(0, rows, step), locations.split(step), weights.split(step))
    for r0, rows_locations, rows_weights in steps:
        if needs_grad and value.device.type == "cpu":
            outs.append(_SampledGather.apply(table, rows_locations, rows_weights, layout, r0))
            continue
        index, mixed = _bags(layout, rows_locations, rows_weights, r0, value.dtype, needs_grad)
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
            n_heads,
            n_levels,
            n_points,
            n_queries,
            s * n_heads,
            b,
            exact32,
            cdt,
            half_size=per_sample(sizes / 2),
            last=per_sample(sizes - 1),
            step=per_sample(torch.stack((torch.full_like(sizes[0], n_heads), sizes[0] * n_heads))),
            offset=(starts * n_heads + heads[:, None])[:, :, None].expand(n_heads, n_levels, n_points).reshape(k),
        )


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


class _SampledGather(torch.autograd.Function):
    """One step of ``ms_deform_attn`` under autograd on CPU: ``_bags``, then the weighted gather,
    keeping only the step's locations and weights (and the table) for the backward.

    The backward recomputes the corner indices and weights (elementwise, cheap) instead of keeping
    them and their autograd graph: about 200 MB less per encoder layer in a training step at
    800x1333. The table's gradient is a sorted weighted gather (``_table_gradient``), 3-8x faster
    than ``embedding_bag``'s own dense backward; the locations' and attention weights' gradients
    run through the recomputed ``_bags`` graph.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, locations: Tensor, weights: Tensor, layout: _Layout, first_row: int) -> Tensor:
        """table: (T, hd); locations: (n, 2, K); weights: (n, K). Returns (n * nH, hd)."""
        index, mixed = _bags(layout, locations, weights, first_row, table.dtype, needs_grad=False)
        ctx.layout, ctx.first_row = layout, first_row
        ctx.save_for_backward(table, locations, weights)
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=mixed)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        table, locations, weights = ctx.saved_tensors
        need_table, need_locations, need_weights, _, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        with torch.enable_grad():
            leaves = (locations.detach().requires_grad_(need_locations), weights.detach().requires_grad_(need_weights))
            needs_grad = need_locations or need_weights
            index, mixed = _bags(ctx.layout, *leaves, ctx.first_row, table.dtype, needs_grad=needs_grad)
        grad_table = _table_gradient(index, mixed.detach(), grad, table.shape[0]) if need_table else None
        grad_locations = grad_weights = None
        if need_locations or need_weights:
            grad_mixed = _weights_gradient(index, table, grad)  # (n * nH, 4 * nL * nP)
            wanted = [leaf for leaf, need in zip(leaves, (need_locations, need_weights)) if need]
            found = iter(torch.autograd.grad(mixed, wanted, grad_mixed))
            grad_locations = next(found) if need_locations else None
            grad_weights = next(found) if need_weights else None
        return grad_table, grad_locations, grad_weights, None, None


def _table_gradient(index: Tensor, weights: Tensor, grad: Tensor, table_rows: int) -> Tensor:
    """The table's gradient of ``embedding_bag(index, table, "sum", per_sample_weights=weights)``.

    ``embedding_bag``'s dense backward accumulates one (bag, slot) at a time. Here the (bag, slot)
    pairs are sorted by table row once (a stable sort, so the summation order, and so the result,
    is the same on every run), and each table row's gradient is then itself a weighted
    ``embedding_bag`` over the output gradient's rows.

    Args:
        index: (n, K) table rows; weights: (n, K); grad: (n, hd) the output's gradient.

    Returns:
        (table_rows, hd)
    """
    k = index.shape[1]
    flat = index.reshape(-1)  # (n * K,), int32 where it fits: sorting it is 2-3x faster than int64
    order = torch.argsort(flat, stable=True)  # (bag, slot) pairs grouped by table row
    counts = torch.bincount(flat, minlength=table_rows)  # (T,)
    offsets = counts.cumsum(0).sub_(counts)  # where each table row's pairs start in ``order``
    bag_of = order.div(k, rounding_mode="floor")  # the output row of each sorted pair
    return F.embedding_bag(bag_of, grad, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order])


def _weights_gradient(index: Tensor, table: Tensor, grad: Tensor) -> Tensor:
    """The per-sample weights' gradient of the same ``embedding_bag``: (n, K), each slot's table
    row dotted with its bag's output gradient (aten's own kernel)."""
    n, k = index.shape
    offsets = torch.arange(0, n * k, k, device=index.device, dtype=index.dtype)
    bag_of = torch.arange(n, device=index.device, dtype=index.dtype).repeat_interleave(k)
    flat = index.reshape(-1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, table, flat, offsets, bag_of, 0, -1).view(
        n, k
    )  # fmt: skip  (mode 0: sum)


def _use_triton(value: Tensor) -> bool:
    """Whether the fused Triton kernels can take ``value`` (GDINO_NO_TRITON=1 opts out).

    Imported here, not with this module: importing triton costs CPU-only users start-up time.
    """
    from gdino.models.grounding_dino.ops.deformable_triton import supported_head_dim, triton_available

    opted_out = os.environ.get("GDINO_NO_TRITON", "") not in ("", "0")
    return not opted_out and triton_available(value.device) and supported_head_dim(value.shape[-1])
