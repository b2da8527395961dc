"""The detection transformer: feature enhancer, language-guided query selection and decoder.

As DETR's ``Transformer.forward(src, mask, query, pos)`` owns its encoder and decoder, this one
takes the image features and the encoded prompt whole and returns the decoder's output; the
heads that turn it into logits and boxes belong to ``GroundingDino``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import GroundingDinoConfig
from .decoder import Decoder
from .encoder import FeatureEnhancer
from .features import ImageFeatures, TextFeatures
from .heads import MLP
from .init import embedding
from .position import sine_position_embedding
from .query_selection import query_padding, select_queries


@dataclass
class Decoded:
    """The transformer's output.

    Attributes:
        hidden: (L, B, Q, D) every decoder layer's normalised output.
        references: (L, B, Q, 4) the reference box each layer's box prediction refines.
        memory_text: (B, T, D) the enhanced text tokens.
        index: (B, Q) the image token (position in the flattened levels) each query came from.
        proposal_tokens: (B, Q, D) the selected tokens' normalised encoder output.
        proposal_boxes: (B, Q, 4) the proposal head's boxes for them, not detached (the encoder
            loss trains the proposal head through them; the decoder gets them detached).
        padded: (B, Q) True on queries selected from padding tokens, or None when there are none
            (see ``query_selection``: images with fewer tokens than queries, in a padded batch).
    """

    hidden: Tensor
    references: Tensor
    memory_text: Tensor
    index: Tensor
    proposal_tokens: Tensor
    proposal_boxes: Tensor
    padded: Tensor | None = None


class Transformer(nn.Module):
    """Feature enhancer, language-guided query selection and decoder (the original ``transformer``).

    Parameter names follow the original checkpoint (``level_embed``, ``tgt_embed``, ...).
    ``init=False`` leaves the embeddings uninitialised, for a checkpoint to fill (``gdino.model.init``).
    """

    def __init__(self, config: GroundingDinoConfig, init: bool = True) -> None:
        super().__init__()
        d = config.d_model
        self.config = config
        self.level_embed = nn.Parameter(torch.zeros(config.num_feature_levels, d))
        self.tgt_embed = embedding(config.num_queries, d, init=init)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)
        self.encoder = FeatureEnhancer(config)
        self.decoder = Decoder(config)
        if init:
            nn.init.normal_(self.level_embed)

    def forward(
        self, image: ImageFeatures, text: TextFeatures, box_head: nn.Module, query_index: Tensor | None = None
    ) -> Decoded:
        """Enhances image and text features, selects the queries and decodes them.

        Args:
            image: the projected multi-scale image features.
            text: the encoded prompt.
            box_head: the box head shared by every decoder layer (refines the reference boxes).
            query_index: (B, Q) image tokens to decode instead of the best-scoring ones.
        """
        shapes = image.shapes
        source, padding = image.flatten()  # (B, S, D), (B, S) True on padding
        ratios = image.valid_ratios(torch.float32)  # (B, nL, 2), float32 in any precision
        low = next(self.encoder.parameters()).dtype  # see GroundingDino.set_precision
        memory, memory_text = self.encoder(
            source.to(low), self._positions(image, source.dtype).to(low), shapes, ratios, padding,
            text.features.to(low), text.padding_mask, text.self_attention, text.position_ids,
        )  # fmt: skip
        high = self.enc_output.weight.dtype
        memory, memory_text = memory.to(high), memory_text.to(high)
        queries, references, index, chosen = select_queries(
            self, memory, padding, shapes, memory_text, text.padding_mask, query_index
        )
        padded = query_padding(padding, index)  # (B, Q) or None: queries on padding, see query_selection
        # Both the original and transformers detach the initial reference boxes: the decoder's
        # losses do not train the proposal head (the encoder-proposal loss does, see Decoded).
        hidden, refs = self.decoder(
            queries, references.detach(), memory, padding, shapes, ratios, memory_text, text.padding_mask,
            box_head, padded,
        )  # fmt: skip
        return Decoded(hidden, refs, memory_text, index, chosen, references, padded)

    def _positions(self, image: ImageFeatures, dtype: torch.dtype) -> Tensor:
        """(B, S, D) sine position embedding of every image token plus its level's embedding."""
        half, temperature = self.config.d_model // 2, self.config.position_temperature
        return torch.cat(
            [
                sine_position_embedding(mask, half, temperature).to(dtype).flatten(2).transpose(1, 2)
                + self.level_embed[level]
                for level, mask in enumerate(image.masks)
            ],
            1,
        )
