"""Multi-scale deformable attention (Deformable DETR): the module with its projections.

Each query looks at ``n_points`` sampled locations per head and per feature level, placed around
its reference point by learned offsets, and mixes the bilinearly sampled values with learned,
softmax-normalised weights. The sampling-and-mixing kernels are in ``gdino.models.grounding_dino.ops``: the module
runs ``ms_deform_attn``, or the per-level ``grid_sample`` version ``ms_deform_attn_reference`` when
its ``grid_sample`` attribute is set: the ONNX export sets it, since ``grid_sample`` maps onto ONNX's
``GridSample`` (opset 16) and its shapes follow the image size, where the gather's index
arithmetic and steps would not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.grounding_dino.ops.deformable import ms_deform_attn, ms_deform_attn_reference

__all__ = ["MultiScaleDeformableAttention", "ms_deform_attn", "ms_deform_attn_reference"]


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
            mask = value_padding_mask[..., None]
            v = v.masked_fill(mask, 0.0) if torch.is_grad_enabled() else v.masked_fill_(mask, 0.0)
        v = v.view(b, v.shape[1], self.n_heads, -1)  # (B, S, nH, hd)
        shape = (b, n_queries, self.n_heads, self.n_levels, self.n_points)
        # Both query projections as one matmul; the parameters stay two Linear layers (checkpoint names).
        n_offsets = self.sampling_offsets.out_features
        projected = F.linear(
            query,
            torch.cat((self.sampling_offsets.weight, self.attention_weights.weight)),
            torch.cat((self.sampling_offsets.bias, self.attention_weights.bias)),
        )
        # split, not two slices: each slice's backward would zero-fill a gradient of the whole.
        offsets, weights = projected.split([n_offsets, projected.shape[-1] - n_offsets], dim=-1)
        offsets = offsets.view(*shape, 2)  # (B, Q, nH, nL, nP, 2)
        weights = weights.view(b, n_queries, self.n_heads, -1)  # (B, Q, nH, nL*nP)
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


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a narrower floating-point type, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
