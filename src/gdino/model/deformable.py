"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

Each query looks at ``n_points`` sampled locations per head and per feature level, placed around
its reference point by learned offsets, and mixes the bilinearly sampled values with learned,
softmax-normalised weights.

``ms_deform_attn`` is the sampling-and-mixing core the module runs: it turns every sample into its
four bilinear corners, folds the attention weight into the corner weights and reads all levels at
once with a single weighted gather (``F.embedding_bag``) from the (B * S * nH, hd) view of the
values. ``ms_deform_attn_reference`` is the straightforward per-level ``grid_sample`` version
(as in transformers) that it is tested against. The module runs the reference instead when its
``grid_sample`` attribute is set: the ONNX export sets it, since ``grid_sample`` maps onto ONNX's
``GridSample`` (opset 16) and its shapes follow the image size, where the gather's index
arithmetic and steps would not.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Samples (query rows x nH x nL x nP) that ``ms_deform_attn`` handles per step. Small steps keep the
# index and weight temporaries in cache (faster on an idle machine with one or two threads) and cut
# the model's peak memory by ~170 MB at 800x1200; on oversubscribed cores, where every step's
# fork/join stalls, larger steps would be faster.
_CHUNK_ELEMENTS = 1 << 18


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Samples every level at the given locations and sums the samples with the given weights.

    The straightforward version (per-level ``grid_sample``, then a weighted sum), as transformers
    computes it: the reference ``ms_deform_attn`` is tested against. Arguments and result as
    ``ms_deform_attn``.
    """
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
    out = (sampled * weights).sum(-1).view(b, n_heads * head_dim, n_queries)  # (B, nH*hd, Q)
    return out.transpose(1, 2)  # (B, Q, nH*hd)


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
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    if len(spatial_shapes) != n_levels or sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not match {n_levels} levels of {s} values in all")
    rows = b * n_queries
    if rows == 0:
        return value.new_zeros(b, n_queries, n_heads * head_dim)
    lp = n_levels * n_points
    k = n_heads * lp
    table_rows = b * s * n_heads
    # Index arithmetic runs in floating point (exact for integers up to 2**24 in float32).
    exact32 = sampling_locations.dtype != torch.float64 and table_rows <= 1 << 24
    cdt = torch.float32 if exact32 else torch.float64
    dev = value.device
    table = value.reshape(table_rows, head_dim)  # row (b * S + pixel) * nH + head

    # Per (head, level, point) constants, as (2, K) planes (x, y) over the flattened samples.
    sizes = torch.tensor([(w, h) for h, w in spatial_shapes], dtype=cdt, device=dev).T  # (2, nL) as (W, H)
    starts = torch.tensor([0] + [h * w for h, w in spatial_shapes[:-1]], dtype=cdt, device=dev).cumsum(0)
    heads = torch.arange(n_heads, dtype=cdt, device=dev)

    def per_sample(t: Tensor) -> Tensor:  # (2, nL) -> (2, K)
        return t[:, None, :, None].expand(2, n_heads, n_levels, n_points).reshape(2, k)

    half_size = per_sample(sizes / 2)
    last = per_sample(sizes - 1)  # last column / row
    step = per_sample(torch.stack((torch.full_like(sizes[0], n_heads), sizes[0] * n_heads)))  # column / row
    offset = (starts * n_heads + heads[:, None])[:, :, None].expand(n_heads, n_levels, n_points).reshape(k)
    zero = torch.zeros((), dtype=cdt, device=dev)
    minus_half = torch.tensor(-0.5, dtype=cdt, device=dev)

    locations = sampling_locations.reshape(rows, k, 2).transpose(1, 2)  # (rows, 2, K)
    weights = attention_weights.reshape(rows, k)
    needs_grad = torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    )
    corners = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) offsets, the order within a bag
    chunk = max(1, _CHUNK_ELEMENTS // k) if dev.type == "cpu" else rows  # steps pay on CPU only
    outs = []
    for r0 in range(0, rows, chunk):
        r1 = min(r0 + chunk, rows)
        n = r1 - r0
        # Pixel coordinates exactly as grid_sample computes them from the [-1, 1] grid, rounding included,
        # in planes: (n, 2, K) as (x, y).
        grid = torch.empty(n, 2, k, dtype=cdt, device=dev).copy_(locations[r0:r1]).mul_(2).sub_(1)
        pixel = torch.addcmul(minus_half, grid.add_(1), half_size)
        near = pixel.detach().floor()
        far = near + 1
        w_far = pixel.sub_(near)  # bilinear weight of the far corner, per axis
        w_near = torch.rsub(w_far, 1)
        near_in = torch.clamp(near, zero, last).nan_to_num_()  # a NaN location reads pixel 0 with NaN weight
        far_in = torch.clamp(far, zero, last).nan_to_num_()
        # A corner outside the map is at least 1 away from its clamped copy: its weight drops to 0.
        w_near = w_near.sub_(near.sub_(near_in).abs_(), alpha=2).clamp_(min=0)
        w_far = w_far.sub_(far.sub_(far_in).abs_(), alpha=2).clamp_(min=0)
        a = weights[r0:r1]
        wy = (w_near[:, 1] * a, w_far[:, 1] * a)  # the attention weight folded into the row weights
        wx = (w_near[:, 0], w_far[:, 0])
        near_in = near_in.mul_(step)
        far_in = far_in.mul_(step)
        base = offset
        if b > 1:
            batch = torch.arange(r0, r1, device=dev).div_(n_queries, rounding_mode="floor")
            base = offset + (batch * (s * n_heads)).to(cdt)[:, None]
        ry = (near_in[:, 1].add_(base), far_in[:, 1].add_(base))
        cx = (near_in[:, 0], far_in[:, 0])

        # One bag per (query, head): its four corners, each over (level, point).
        def bag(t: Tensor) -> Tensor:
            return t.view(n, n_heads, lp)

        index = torch.empty(n, n_heads, 4, lp, dtype=cdt, device=dev)
        for j, (y, x) in enumerate(corners):
            torch.add(bag(ry[y]), bag(cx[x]), out=index[:, :, j])
        if needs_grad:  # out= records no autograd
            mixed = torch.stack([bag(wy[y] * wx[x]) for y, x in corners], 2).to(value.dtype)
        else:
            mixed = torch.empty(n, n_heads, 4, lp, dtype=value.dtype, device=dev)
            for j, (y, x) in enumerate(corners):
                torch.mul(bag(wy[y]), bag(wx[x]), out=mixed[:, :, j])
        index = index.view(n * n_heads, 4 * lp).to(torch.int32 if exact32 else torch.int64)
        outs.append(F.embedding_bag(index, table, mode="sum", per_sample_weights=mixed.view(n * n_heads, 4 * lp)))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(b, n_queries, n_heads * head_dim)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over a flattened multi-scale feature map.

    Args:
        d_model: width D of queries and values.
        n_levels: number of feature levels nL.
        n_heads: number of heads nH (D must be divisible by it).
        n_points: sampled points nP per head and level.

    Attributes:
        grid_sample: run ``ms_deform_attn_reference`` (per-level ``grid_sample``) instead of
            ``ms_deform_attn``; set for ONNX export (``gdino.export.onnx``), off by default.
    """

    grid_sample: bool = False

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attends each query to points around its reference point on every level.

        Args:
            query: (B, Q, D), position embedding already added.
            reference_points: (B, Q, nL, 2) points (x, y) or (B, Q, nL, 4) boxes (cx, cy, w, h),
                normalised to [0, 1] and already scaled by each level's valid ratios.
            value: (B, S, D), the flattened levels, S = sum(H * W).
            spatial_shapes: (H, W) of each level.
            value_padding_mask: (B, S), True at padding positions (their values are zeroed), or None.

        Returns:
            (B, Q, D)
        """
        b, n_queries, _ = query.shape
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill_(value_padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], self.n_heads, -1)  # (B, S, nH, hd)
        shape = (b, n_queries, self.n_heads, self.n_levels, self.n_points)
        # Both query projections as one matmul; the parameters stay two Linear layers (checkpoint names).
        n_offsets = self.sampling_offsets.out_features
        projected = F.linear(
            query,
            torch.cat((self.sampling_offsets.weight, self.attention_weights.weight)),
            torch.cat((self.sampling_offsets.bias, self.attention_weights.bias)),
        )
        offsets = projected[..., :n_offsets].view(*shape, 2)  # (B, Q, nH, nL, nP, 2)
        weights = projected[..., n_offsets:].view(b, n_queries, self.n_heads, -1)  # (B, Q, nH, nL*nP)
        # Softmax and sampling locations in float32 whatever the layer's dtype (a no-op in float32):
        # a bfloat16 location on a 150-pixel-wide level is only good to about half a pixel.
        weights = _wide(weights).softmax(-1).view(shape)  # (B, Q, nH, nL, nP)
        locations = self._sampling_locations(_wide(reference_points), _wide(offsets), spatial_shapes)
        attend = ms_deform_attn_reference if self.grid_sample else ms_deform_attn
        return self.output_proj(attend(v, spatial_shapes, locations, weights))

    def _sampling_locations(
        self, reference_points: Tensor, offsets: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """(B, Q, nL, 2|4) references and (B, Q, nH, nL, nP, 2) offsets -> (B, Q, nH, nL, nP, 2) locations.

        Offsets are in pixels of each level for point references, and in units of half the box size
        divided by nP for box references.
        """
        ref = reference_points[:, :, None, :, None]  # (B, Q, 1, nL, 1, 2|4)
        if reference_points.shape[-1] == 2:
            wh = [(w, h) for h, w in spatial_shapes]
            normalizer = torch.tensor(wh, dtype=offsets.dtype, device=offsets.device)  # (nL, 2)
            return torch.addcdiv(ref, offsets, normalizer[:, None, :])  # ref + offsets / normalizer, one pass
        if reference_points.shape[-1] == 4:
            return ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        raise ValueError(f"reference_points must end in 2 or 4 coordinates, not {reference_points.shape[-1]}")


def _use_triton(value: Tensor) -> bool:
    """Whether the fused Triton kernels can take ``value`` (GDINO_NO_TRITON=1 opts out).

    Imported here, not with this module: importing triton costs CPU-only users start-up time.
    """
    from .deformable_triton import supported_head_dim, triton_available

    opted_out = os.environ.get("GDINO_NO_TRITON", "") not in ("", "0")
    return not opted_out and triton_available(value.device) and supported_head_dim(value.shape[-1])


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a narrower floating-point type, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
