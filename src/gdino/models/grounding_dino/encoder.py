"""The feature enhancer: the encoder that refines image and text tokens together.

Each of its layers runs, in order:

1. image-text fusion (bi-directional cross-attention, ``fusion_layers.{i}``),
2. text self-attention within each phrase, with a sine embedding of the token's position in its
   phrase added to queries and keys, then a feed-forward block (``text_layers.{i}``),
3. multi-scale deformable self-attention of the image tokens, with the image position embedding
   added to the queries, then a feed-forward block (``layers.{i}``).

All blocks are post-norm: x <- norm(x + block(x)).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gdino.models.grounding_dino.attention import MultiheadAttention
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention
from gdino.models.grounding_dino.ffn import residual_ffn
from gdino.models.grounding_dino.fusion import FusionLayer
from gdino.models.grounding_dino.position import coordinate_sine_embedding


def encoder_reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """The centre of every image token, as each level's deformable attention sees it.

    Args:
        spatial_shapes: (H, W) of each of the nL levels.
        valid_ratios: (B, nL, 2), the (width, height) fraction of each level that is not padding.

    Returns:
        (B, S, nL, 2) points (x, y): the token centre normalised by its own level's valid extent,
        then scaled by every level's valid ratios.
    """
    dtype, device = valid_ratios.dtype, valid_ratios.device
    points = []
    for level, (h, w) in enumerate(spatial_shapes):
        # Pixel centres 0.5, 1.5, ... (exactly what linspace(0.5, h - 0.5, h) gives; an exported
        # linspace would fix the level's size).
        ys = torch.arange(h, dtype=dtype, device=device) + 0.5
        xs = torch.arange(w, dtype=dtype, device=device) + 0.5
        y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        y = y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)  # (B, H*W)
        x = x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)  # (B, H*W)
        points.append(torch.stack((x, y), -1))  # (B, H*W, 2)
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]  # (B, S, nL, 2)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention of the image tokens, then a feed-forward block."""

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MultiScaleDeformableAttention(
            d, config.num_feature_levels, config.encoder_heads, config.encoder_points
        )
        self.norm1 = nn.LayerNorm(d, config.layer_norm_eps)
        self.linear1 = nn.Linear(d, config.encoder_ffn_dim)
        self.linear2 = nn.Linear(config.encoder_ffn_dim, d)
        self.norm2 = nn.LayerNorm(d, config.layer_norm_eps)

    def forward(
        self,
        vision: Tensor,
        vision_pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: list[tuple[int, int]],
        padding_mask: Tensor,
    ) -> Tensor:
        """Image tokens (B, S, D), their position embedding (B, S, D), reference points
        (B, S, nL, 2) and padding mask (B, S) (True = padding) -> (B, S, D)."""
        attended = self.self_attn(vision + vision_pos, reference_points, vision, spatial_shapes, padding_mask)
        # Out of place under autograd: in place on the projection's (view) output costs a copy of it.
        vision = self.norm1(attended + vision if torch.is_grad_enabled() else attended.add_(vision))
        return self.norm2(residual_ffn(vision, self.linear1, self.linear2))


class TextEnhancerLayer(nn.Module):
    """Self-attention of the text tokens, then a feed-forward block."""

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MultiheadAttention(d, config.text_enhancer_heads)
        self.linear1 = nn.Linear(d, config.text_enhancer_ffn_dim)
        self.linear2 = nn.Linear(config.text_enhancer_ffn_dim, d)
        self.norm1 = nn.LayerNorm(d, config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(d, config.layer_norm_eps)

    def forward(self, text: Tensor, text_pos: Tensor, allowed: Tensor) -> Tensor:
        """Text tokens (B, T, D), their position embedding (B, T, D) and attention mask (B, 1, T, T)
        (True = may attend) -> (B, T, D). The position embedding goes into queries and keys only."""
        query = text + text_pos
        text = self.norm1(text + self.self_attn(query, query, text, allowed))
        return self.norm2(residual_ffn(text, self.linear1, self.linear2))


class FeatureEnhancer(nn.Module):
    """``config.encoder_layers`` rounds of fusion, text self-attention and deformable self-attention."""

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__()
        n, c = config.encoder_layers, config
        self.layers = nn.ModuleList(DeformableEncoderLayer(c) for _ in range(n))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(c) for _ in range(n))
        self.fusion_layers = nn.ModuleList(
            FusionLayer(c.d_model, c.fusion_dim, c.fusion_heads, c.layer_norm_eps) for _ in range(n)
        )

    def forward(
        self,
        vision: Tensor,
        vision_pos: Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: Tensor,
        vision_padding_mask: Tensor,
        text: Tensor,
        text_padding_mask: Tensor,
        text_self_attention: Tensor,
        text_position_ids: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Refines the image and text tokens together.

        Args:
            vision: (B, S, D) flattened multi-scale image tokens, S = sum(H * W).
            vision_pos: (B, S, D) image position embedding (level embedding included).
            spatial_shapes: (H, W) of each level, in flattening order.
            valid_ratios: (B, nL, 2) (width, height) fraction of each level that is not padding.
            vision_padding_mask: (B, S) bool, True at image padding.
            text: (B, T, D) projected text tokens.
            text_padding_mask: (B, T) bool, True at text padding.
            text_self_attention: (B, T, T) bool, True where token i may attend token j.
            text_position_ids: (B, T) position of each token within its phrase.

        Returns:
            Image tokens (B, S, D) and text tokens (B, T, D).
        """
        # Reference points and positions in float32 whatever the layers' dtype: in bfloat16 a
        # token centre on a 150-wide level would be off by up to half a pixel.
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios.float())  # (B, S, nL, 2)
        positions = text_position_ids[..., None].float()  # (B, T, 1)
        text_pos = coordinate_sine_embedding(positions, num_feats=text.shape[-1], temperature=10000)  # (B, T, D)
        text_pos = text_pos.to(text.dtype)
        allowed = text_self_attention[:, None]  # (B, 1, T, T)
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            vision, text = fusion(vision, text, vision_padding_mask, text_padding_mask)
            text = text_layer(text, text_pos, allowed)
            vision = layer(vision, vision_pos, reference_points, spatial_shapes, vision_padding_mask)
        return vision, text
