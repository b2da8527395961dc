"""The detection decoder: queries attend to each other, to the text and to the image.

Each layer runs, in this order, with a post-norm residual around each step:

1. self-attention among the queries (query position added to queries and keys),
2. cross-attention to the text tokens (query position added to the queries),
3. multi-scale deformable cross-attention to the image memory around each query's reference box,
4. a ReLU feed-forward block.

The query position is a sine embedding of the query's reference box (the reference scales it by the
first level's valid ratio, see ``query_position``) passed through ``ref_point_head``. After every
layer its box head, which the detector owns (one shared by every layer, or one per layer when the
checkpoint has them: MM-Grounding-DINO's ``decoder_bbox_embed_share: false``), refines the
reference boxes (iterative box refinement); the refined boxes are the next layer's references.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gdino.models.grounding_dino.attention import MultiheadAttention
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention
from gdino.models.grounding_dino.ffn import residual_ffn
from gdino.models.grounding_dino.heads import MLP, refine_boxes
from gdino.models.grounding_dino.position import coordinate_sine_embedding


class DecoderLayer(nn.Module):
    """One decoder layer: self-attention, text cross-attention, deformable image cross-attention, FFN."""

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.self_attn = MultiheadAttention(d, config.decoder_heads)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.ca_text = MultiheadAttention(d, config.decoder_heads)
        self.catext_norm = nn.LayerNorm(d, eps=eps)
        self.cross_attn = MultiScaleDeformableAttention(
            d, config.num_feature_levels, config.decoder_heads, config.decoder_points
        )
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.linear1 = nn.Linear(d, config.decoder_ffn_dim)
        self.linear2 = nn.Linear(config.decoder_ffn_dim, d)
        self.norm3 = nn.LayerNorm(d, eps=eps)

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        text: Tensor,
        text_allowed: Tensor,
        query_allowed: Tensor | None = None,
    ) -> Tensor:
        """Updates the queries.

        Args:
            x: (B, Q, D) queries.
            query_pos: (B, Q, D) query position embedding.
            reference_points: (B, Q, nL, 4) reference boxes scaled by each level's valid ratio.
            memory: (B, S, D) flattened multi-scale image features.
            memory_padding_mask: (B, S) bool, True on padding pixels, or None.
            spatial_shapes: (height, width) of each level, S = sum of height * width.
            text: (B, T, D) text tokens.
            text_allowed: (B, 1, 1, T) bool, True on real (non-padding) tokens.
            query_allowed: bool broadcastable to (B, 1, Q, Q), True where query i may attend query j; None: all.

        Returns:
            (B, Q, D) updated queries.
        """
        q = x + query_pos
        x = self.norm2(x + self.self_attn(q, q, x, allowed=query_allowed))
        x = self.catext_norm(x + self.ca_text(x + query_pos, text, text, allowed=text_allowed))
        attended = self.cross_attn(x + query_pos, reference_points, memory, spatial_shapes, memory_padding_mask)
        x = self.norm1(x + attended)
        return self.norm3(residual_ffn(x, self.linear1, self.linear2))


class Decoder(nn.Module):
    """``decoder_layers`` decoder layers with iterative box refinement and a shared final norm."""

    def __init__(self, config: GroundingDinoConfig) -> None:
        super().__init__()
        d = config.d_model
        self.d_model = d
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ref_point_head = MLP(2 * d, d, d, 2)
        self.box_logit = (config.box_logit_eps, config.box_logit_original)  # see heads.box_logit

    def query_position(self, reference: Tensor) -> Tensor:
        """(B, Q, 4) reference boxes -> (B, Q, D) query position.

        The reference embeds the box scaled by the first level's valid ratio, which is 1 for an
        image alone but not inside a padded batch; embedding the box itself gives the same result
        alone and keeps a padded image's result independent of its batch.
        """
        return self.ref_point_head(coordinate_sine_embedding(reference, self.d_model // 2))

    def forward(
        self,
        queries: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        memory_padding_mask: Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: Tensor,
        text: Tensor,
        text_padding_mask: Tensor,
        box_heads: Sequence[nn.Module],
        query_allowed: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decodes the queries, refining their reference boxes after every layer.

        Args:
            queries: (B, Q, D) initial queries.
            reference_points: (B, Q, 4) initial reference boxes ``(cx, cy, w, h)`` in ``[0, 1]``.
            memory: (B, S, D) flattened multi-scale image features from the encoder.
            memory_padding_mask: (B, S) bool, True on padding pixels, or None (no padding).
            spatial_shapes: (height, width) of each level, S = sum of height * width.
            valid_ratios: (B, nL, 2) unpadded fraction ``(width, height)`` of each level.
            text: (B, T, D) text tokens from the encoder.
            text_padding_mask: (B, T) bool, True on padding tokens.
            box_heads: each layer's box head (the same module for every layer when the detector
                shares one), (..., D) -> (..., 4) delta in logit space.
            query_allowed: bool, broadcastable to (B, 1, Q, Q): True where query i may attend
                query j (False on queries selected from padding, see ``query_selection``, and
                between denoising groups), or None: everywhere.

        Returns:
            hidden: (L, B, Q, D) every layer's output after the final norm.
            references: (L, B, Q, 4) the reference boxes each layer's box prediction refines
                (the initial ones for layer 0); see ``heads.predict_boxes``.
        """
        text_allowed = ~text_padding_mask[:, None, None, :]  # (B, 1, 1, T)
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, nL, 4)
        x, hidden, references = queries, [], []
        for i, layer in enumerate(self.layers):
            scaled = reference_points[:, :, None] * ratios  # (B, Q, nL, 4)
            query_pos = self.query_position(reference_points)
            x = layer(
                x, query_pos, scaled, memory, memory_padding_mask, spatial_shapes, text, text_allowed, query_allowed
            )
            hidden.append(self.norm(x))
            references.append(reference_points)
            if i < len(self.layers) - 1:  # the box head refines the un-normalized output
                reference_points = refine_boxes(box_heads[i](x), reference_points, *self.box_logit).detach()
        return torch.stack(hidden), torch.stack(references)  # (L, B, Q, D), (L, B, Q, 4)
