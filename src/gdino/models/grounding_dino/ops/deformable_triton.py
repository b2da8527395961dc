"""Multi-scale deformable attention as fused Triton kernels (forward and backward), for CUDA GPUs.

Optional: the package imports and runs without ``triton``; ``ms_deform_attn`` in ``ops.deformable``
dispatches here only for CUDA tensors when ``triton_available`` says so (and ``GDINO_NO_TRITON`` is
not set). Same contract as ``deformable.ms_deform_attn_reference``: bilinear sampling exactly as
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` of the grid
``2 * loc - 1`` (pixel coordinate ``loc * W - 0.5``; corners outside the map read zero).

Tiling. One program per (batch * query, head), launched on the grid (B * Q, nH). A program owns
one output row of hd values and the nL * nP samples that feed it, flattened into one lane axis
``k = level * nP + point`` padded to ``BLOCK_LP`` (the next power of two; 16 for nL = nP = 4).
Each lane looks up its level's (H, W) and first row in the flattened value from two tiny int32
tensors, computes its pixel coordinate, and the program gathers the four bilinear corners as
(BLOCK_LP, hd) tiles, each row a contiguous hd-vector of ``value[b, pixel, head]`` (one coalesced
64/128-byte read per sample and corner). The forward accumulates ``attention * corner weight *
corner value`` in fp32 (fp64 for fp64 inputs) and reduces over the lanes: no atomics, one store
of hd values in the value's dtype.

The backward runs on the same grid. Per corner it re-gathers the value tile and
  * adds ``attention * corner weight * grad_out`` into an fp32 (fp64) copy of grad_value with
    ``tl.atomic_add`` (many queries sample the same pixels), cast to the value's dtype at the end;
  * reduces ``dot = <value corner, grad_out>`` over hd, which gives, per lane,
    grad_attention = sum_corners weight * dot and grad_location = attention * W (or H) *
    sum_corners (+-) other-axis weight * dot. A lane's location and attention-weight gradients
    belong to that program only, so they are plain stores in the inputs' dtypes.

Launch: 4 warps for the forward's 16 x 32 corner tile, 8 for the backward's (it holds more per
lane); picked from register counts of kernels compiled for sm_80/sm_90, not timed on a GPU.
The head dim must be a power of two (``tl.arange``); anything else raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any

import torch
from torch import Tensor

try:  # optional dependency: the kernels exist only where triton imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by the no-triton import check
    triton = None
    tl = None

__all__ = ["ms_deform_attn_triton", "supported_head_dim", "triton_available"]


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str) -> bool:
    """Whether the kernels can run on ``device``: triton imports and the device is CUDA, or
    ``TRITON_INTERPRET=1`` is set (triton's numpy interpreter, for CPU tests)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpret_env()


def supported_head_dim(head_dim: int) -> bool:
    """The kernels tile the head dim with ``tl.arange``: it must be a power of two."""
    return head_dim >= 1 and head_dim & (head_dim - 1) == 0


if triton is not None:
    # Kernel arguments: *_ptr are tensors, Q and S ints, the upper-case names compile-time constants
    # (one compiled variant per head count, head dim, levels x points and accumulator dtype).

    @triton.jit
    def _corner(
        value_ptr,
        row_base,
        h,
        xc,
        yc,
        w_lvl,
        h_lvl,
        lane_mask,
        d,
        N_HEADS: tl.constexpr,
        HD: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Gathers one bilinear corner for every lane: (BLOCK_LP, HD) values in ACC, and its mask.

        xc, yc: (BLOCK_LP,) float corner pixel coordinates; row_base: (BLOCK_LP,) int64 row of the
        level's first pixel in the (B * S) rows of ``value``.
        """
        inside = lane_mask & (xc >= 0) & (xc < w_lvl) & (yc >= 0) & (yc < h_lvl)  # NaN: outside
        xi = tl.where(inside, xc, 0.0).to(tl.int64)  # never converts an out-of-range float
        yi = tl.where(inside, yc, 0.0).to(tl.int64)
        row = row_base + yi * w_lvl + xi  # (BLOCK_LP,) pixel row in (B * S)
        offs = (row * N_HEADS + h) * HD  # start of value[b, pixel, h, :]
        ptrs = value_ptr + offs[:, None] + d[None, :]  # (BLOCK_LP, HD)
        v = tl.load(ptrs, mask=inside[:, None], other=0.0).to(ACC)
        return v, inside, offs

    @triton.jit
    def _lanes(
        shapes_ptr,
        starts_ptr,
        loc_ptr,
        attn_ptr,
        row,
        b,
        S,
        LP: tl.constexpr,
        NP: tl.constexpr,
        BLOCK_LP: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Per-lane (level, point) setup shared by both kernels: level sizes, pixel coordinates
        (rounded exactly as grid_sample computes them), attention weights and the level's first row."""
        k = tl.arange(0, BLOCK_LP)  # (BLOCK_LP,) lane = level * nP + point
        lane_mask = k < LP
        level = k // NP
        h_lvl = tl.load(shapes_ptr + level * 2, mask=lane_mask, other=1).to(tl.int64)
        w_lvl = tl.load(shapes_ptr + level * 2 + 1, mask=lane_mask, other=1).to(tl.int64)
        start = tl.load(starts_ptr + level, mask=lane_mask, other=0).to(tl.int64)
        sample = row * LP + k  # (BLOCK_LP,) index into (B * Q * nH * nL * nP)
        loc_x = tl.load(loc_ptr + sample * 2, mask=lane_mask, other=0.0).to(ACC)
        loc_y = tl.load(loc_ptr + sample * 2 + 1, mask=lane_mask, other=0.0).to(ACC)
        attn = tl.load(attn_ptr + sample, mask=lane_mask, other=0.0).to(ACC)
        # grid_sample(align_corners=False) on the grid 2 * loc - 1: ((g + 1) * size - 1) / 2.
        px = ((loc_x * 2.0 - 1.0 + 1.0) * w_lvl.to(ACC) - 1.0) * 0.5
        py = ((loc_y * 2.0 - 1.0 + 1.0) * h_lvl.to(ACC) - 1.0) * 0.5
        x0 = tl.floor(px)
        y0 = tl.floor(py)
        fx = px - x0  # weight of the right column
        fy = py - y0  # weight of the bottom row
        row_base = b * S + start  # (BLOCK_LP,) int64
        return k, lane_mask, sample, h_lvl, w_lvl, row_base, x0, y0, fx, fy, attn

    @triton.jit
    def _fwd_kernel(
        value_ptr,
        shapes_ptr,
        starts_ptr,
        loc_ptr,
        attn_ptr,
        out_ptr,
        Q,
        S,
        N_HEADS: tl.constexpr,
        HD: tl.constexpr,
        LP: tl.constexpr,
        NP: tl.constexpr,
        BLOCK_LP: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid (B * Q, nH): out[bq, h * HD:(h + 1) * HD] = sum over lanes and corners."""
        bq = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        b = bq // Q
        row = bq * N_HEADS + h  # (b, q, h) row of the (B * Q * nH, ...) views
        d = tl.arange(0, HD)
        _k, lane_mask, _sample, h_lvl, w_lvl, row_base, x0, y0, fx, fy, attn = _lanes(
            shapes_ptr, starts_ptr, loc_ptr, attn_ptr, row, b, S, LP, NP, BLOCK_LP, ACC
        )
        acc = tl.zeros((BLOCK_LP, HD), dtype=ACC)
        for dy in tl.static_range(2):
            wy = fy if dy == 1 else 1.0 - fy
            for dx in tl.static_range(2):
                wx = fx if dx == 1 else 1.0 - fx
                v, _inside, _offs = _corner(
                    value_ptr, row_base, h, x0 + dx, y0 + dy, w_lvl, h_lvl, lane_mask, d, N_HEADS, HD, ACC
                )
                acc += v * (attn * wx * wy)[:, None]
        out = tl.sum(acc, axis=0)  # (HD,)
        tl.store(out_ptr + row * HD + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _bwd_kernel(
        value_ptr,
        shapes_ptr,
        starts_ptr,
        loc_ptr,
        attn_ptr,
        grad_out_ptr,
        grad_value_ptr,
        grad_loc_ptr,
        grad_attn_ptr,
        Q,
        S,
        N_HEADS: tl.constexpr,
        HD: tl.constexpr,
        LP: tl.constexpr,
        NP: tl.constexpr,
        BLOCK_LP: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Grid (B * Q, nH): atomically adds into grad_value (ACC buffer), stores this row's
        grad_loc (x, y per lane) and grad_attn (per lane)."""
        bq = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        b = bq // Q
        row = bq * N_HEADS + h
        d = tl.arange(0, HD)
        _k, lane_mask, sample, h_lvl, w_lvl, row_base, x0, y0, fx, fy, attn = _lanes(
            shapes_ptr, starts_ptr, loc_ptr, attn_ptr, row, b, S, LP, NP, BLOCK_LP, ACC
        )
        g = tl.load(grad_out_ptr + row * HD + d).to(ACC)  # (HD,)
        g_attn = tl.zeros((BLOCK_LP,), dtype=ACC)  # d out / d attn, dotted with g
        g_fx = tl.zeros((BLOCK_LP,), dtype=ACC)  # d out / d px, dotted with g, before attn
        g_fy = tl.zeros((BLOCK_LP,), dtype=ACC)
        for dy in tl.static_range(2):
            wy = fy if dy == 1 else 1.0 - fy
            sy = 1.0 if dy == 1 else -1.0  # d wy / d py
            for dx in tl.static_range(2):
                wx = fx if dx == 1 else 1.0 - fx
                sx = 1.0 if dx == 1 else -1.0  # d wx / d px
                v, inside, offs = _corner(
                    value_ptr, row_base, h, x0 + dx, y0 + dy, w_lvl, h_lvl, lane_mask, d, N_HEADS, HD, ACC
                )
                dot = tl.sum(v * g[None, :], axis=1)  # (BLOCK_LP,) <corner value, grad_out>
                g_attn += wx * wy * dot
                g_fx += sx * wy * dot
                g_fy += sy * wx * dot
                contribution = (attn * wx * wy)[:, None] * g[None, :]  # (BLOCK_LP, HD)
                tl.atomic_add(
                    grad_value_ptr + offs[:, None] + d[None, :], contribution, mask=inside[:, None], sem="relaxed"
                )
        # d px / d loc_x = W (px = loc_x * W - 0.5), d py / d loc_y = H.
        grad_x = attn * g_fx * w_lvl.to(ACC)
        grad_y = attn * g_fy * h_lvl.to(ACC)
        loc_ty = grad_loc_ptr.dtype.element_ty
        tl.store(grad_loc_ptr + sample * 2, grad_x.to(loc_ty), mask=lane_mask)
        tl.store(grad_loc_ptr + sample * 2 + 1, grad_y.to(loc_ty), mask=lane_mask)
        tl.store(grad_attn_ptr + sample, g_attn.to(grad_attn_ptr.dtype.element_ty), mask=lane_mask)

    # Whether the kernels above run in triton's numpy interpreter (on CPU tensors). Decided once, at
    # decoration: ``triton.jit`` returns an interpreted function only if TRITON_INTERPRET=1 then.
    _INTERPRETED: bool = type(_fwd_kernel).__name__ == "InterpretedFunction"


def _constants(n_heads: int, n_levels: int, n_points: int, head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    """Compile-time constants shared by both kernels."""
    lp = n_levels * n_points
    return {
        "N_HEADS": n_heads,
        "HD": head_dim,
        "LP": lp,
        "NP": n_points,
        "BLOCK_LP": triton.next_power_of_2(lp),
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _num_warps(constants: dict[str, Any], elements_per_thread: int) -> int:
    """Warps for one (BLOCK_LP, HD) corner tile at about ``elements_per_thread`` each, 1 to 8.

    Untuned (no GPU at hand): compiled for sm_90, a 16 x 32 tile takes 56 registers a thread in the
    forward at 4 warps (92 at 2), and 64 in the backward at 8 warps (106 at 4, 186 at 2), no spills.
    """
    tile = constants["BLOCK_LP"] * constants["HD"]
    return max(1, min(8, tile // (32 * elements_per_thread)))


def _on(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Triton launches on the current CUDA device: make it the tensors' (cuda:1 with cuda:0 current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        value: Tensor,  # (B, S, nH, hd)
        shapes: Tensor,  # (nL, 2) int32 (H, W)
        starts: Tensor,  # (nL,) int32 first row of each level
        sampling_locations: Tensor,  # (B, Q, nH, nL, nP, 2)
        attention_weights: Tensor,  # (B, Q, nH, nL, nP)
    ) -> Tensor:
        b, s, n_heads, head_dim = value.shape
        _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        out = value.new_empty(b, n_queries, n_heads * head_dim)  # (B, Q, nH*hd)
        constants = _constants(n_heads, n_levels, n_points, head_dim, value.dtype)
        with _on(value.device):
            _fwd_kernel[(b * n_queries, n_heads)](
                value,
                shapes,
                starts,
                sampling_locations,
                attention_weights,
                out,
                n_queries,
                s,
                **constants,
                num_warps=_num_warps(constants, 4),
                enable_fp_fusion=True,
            )
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
        b, s, n_heads, head_dim = value.shape
        _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
        grad_out = grad_out.contiguous()  # (B, Q, nH*hd)
        acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)  # atomics target
        grad_loc = torch.empty_like(sampling_locations)
        grad_attn = torch.empty_like(attention_weights)
        constants = _constants(n_heads, n_levels, n_points, head_dim, value.dtype)
        with _on(value.device):
            _bwd_kernel[(b * n_queries, n_heads)](
                value,
                shapes,
                starts,
                sampling_locations,
                attention_weights,
                grad_out,
                grad_value,
                grad_loc,
                grad_attn,
                n_queries,
                s,
                **constants,
                num_warps=_num_warps(constants, 2),
                enable_fp_fusion=True,
            )
        needs = ctx.needs_input_grad
        return (
            grad_value.to(value.dtype) if needs[0] else None,
            None,
            None,
            grad_loc if needs[3] else None,
            grad_attn if needs[4] else None,
        )


@functools.lru_cache(maxsize=64)
def _level_tables(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """(nL, 2) int32 (H, W) and (nL,) int32 first row of each level, on ``device``; cached, so a model's
    layers do not each copy them to the GPU (a synchronising host-to-device copy)."""
    shapes = torch.tensor(spatial_shapes, dtype=torch.int32).view(len(spatial_shapes), 2)
    starts = torch.tensor([0] + [h * w for h, w in spatial_shapes[:-1]], dtype=torch.int64).cumsum(0)
    if starts[-1] + spatial_shapes[-1][0] * spatial_shapes[-1][1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"spatial_shapes {spatial_shapes}: more than 2**31 - 1 pixels")
    return shapes.to(device), starts.to(device=device, dtype=torch.int32)


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Samples every level at the given locations and sums the samples with the given weights.

    Same contract as ``deformable.ms_deform_attn_reference``, as fused Triton kernels with autograd.
    Accumulates in fp32 (fp64 for fp64 values); fp16 and bf16 inputs are read as they are.

    Args:
        value: (B, S, nH, hd), the levels flattened row-major one after another, S = sum(H * W);
            hd must be a power of two.
        spatial_shapes: (H, W) of each of the nL levels, in the order they are flattened in ``value``.
        sampling_locations: (B, Q, nH, nL, nP, 2), (x, y) in [0, 1] relative to each level's
            width and height; points outside read zeros.
        attention_weights: (B, Q, nH, nL, nP), the weight of each sample.

    Returns:
        (B, Q, nH * hd) in the value's dtype.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: the head dim is not a power of two, the shapes disagree, or the tensors are not
            on CUDA (outside triton's interpreter mode).
    """
    if triton is None:
        raise RuntimeError("ms_deform_attn_triton needs triton: pip install triton (the 'gpu' extra)")
    b, s, n_heads, head_dim = value.shape
    if not supported_head_dim(head_dim):
        raise ValueError(f"ms_deform_attn_triton needs a power-of-two head dim, not {head_dim}")
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    if len(spatial_shapes) != n_levels or sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not match {n_levels} levels of {s} values in all")
    if sampling_locations.shape[:3] != (b, n_queries, n_heads) or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} do not match value {tuple(value.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        msg = f"attention_weights {tuple(attention_weights.shape)}, locations {tuple(sampling_locations.shape)}"
        raise ValueError(f"{msg} do not match")
    if not _INTERPRETED and not (value.is_cuda and sampling_locations.is_cuda and attention_weights.is_cuda):
        raise ValueError("ms_deform_attn_triton runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    if b * n_queries == 0 or n_heads == 0 or n_levels * n_points == 0:
        return value.new_zeros(b, n_queries, n_heads * head_dim)
    shapes, starts = _level_tables(tuple((int(h), int(w)) for h, w in spatial_shapes), value.device)
    return _MSDeformAttnFunction.apply(value, shapes, starts, sampling_locations, attention_weights)
