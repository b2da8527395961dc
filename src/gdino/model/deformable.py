"""Multi-scale deformable attention (Deformable DETR), in plain PyTorch.

Each query looks at ``n_points`` sampled locations per head and per feature level, placed around
its reference point by learned offsets, and mixes the bilinearly sampled values with learned,
softmax-normalised weights. ``ms_deform_attn`` is the sampling-and-mixing core; it is the
reference any fused kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Samples every level at the given locations and sums the samples with the given weights.

    Args:
        value: (B, S, nH, hd), the levels flattened row-major one after another, S = sum(H * W).
        spatial_shapes: (H, W) of each of the nL levels, in the order they are flattened in ``value``.
        sampling_locations: (B, Q, nH, nL, nP, 2), (x, y) in [0, 1] relative to each level's
            width and height; points outside read zeros.
        attention_weights: (B, Q, nH, nL, nP), the weight of each sample.

    Returns:
        (B, Q, nH * hd)
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


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of queries over a flattened multi-scale feature map.

    Args:
        d_model: width D of queries and values.
        n_levels: number of feature levels nL.
        n_heads: number of heads nH (D must be divisible by it).
        n_points: sampled points nP per head and level.
    """

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
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], self.n_heads, -1)  # (B, S, nH, hd)
        shape = (b, n_queries, self.n_heads, self.n_levels, self.n_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)  # (B, Q, nH, nL, nP, 2)
        weights = self.attention_weights(query).view(b, n_queries, self.n_heads, -1)  # (B, Q, nH, nL*nP)
        weights = weights.softmax(-1).view(shape)  # (B, Q, nH, nL, nP)
        locations = self._sampling_locations(reference_points, offsets, spatial_shapes)
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))

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
            return ref + offsets / normalizer[:, None, :]
        if reference_points.shape[-1] == 4:
            return ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        raise ValueError(f"reference_points must end in 2 or 4 coordinates, not {reference_points.shape[-1]}")
