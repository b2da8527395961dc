"""The detection transformer: feature enhancer, language-guided query selection and decoder.

As DETR's ``Transformer.forward(src, mask, query, pos)`` owns its encoder and decoder, this one
takes the image features and the encoded prompt whole and returns the decoder's output; the
heads that turn it into logits and boxes belong to ``GroundingDino``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.decoder import Decoder
from gdino.models.grounding_dino.encoder import FeatureEnhancer
from gdino.models.grounding_dino.features import DenoisingQueries, ImageFeatures, TextFeatures
from gdino.models.grounding_dino.heads import MLP, ClassHead
from gdino.models.grounding_dino.init import embedding
from gdino.models.grounding_dino.position import sine_position_embedding
from gdino.models.grounding_dino.query_selection import query_padding, select_queries


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
        denoise_hidden, denoise_references: (L, B, N, D) and (L, B, N, 4), the same for the
            denoising queries when there were any (training), else None.
    """

    hidden: Tensor
    references: Tensor
    memory_text: Tensor
    index: Tensor
    proposal_tokens: Tensor
    proposal_boxes: Tensor
    padded: Tensor | None = None
    denoise_hidden: Tensor | None = None
    denoise_references: Tensor | None = None


class Transformer(nn.Module):
    """Feature enhancer, language-guided query selection and decoder (the original ``transformer``).

    Parameter names follow the original checkpoint (``level_embed``, ``tgt_embed``, ...).
    ``init=False`` leaves the embeddings uninitialised, for a checkpoint to fill (``gdino.models.grounding_dino.init``).
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
        self.enc_out_class_embed = ClassHead(config.contrastive_bias)
        self.encoder = FeatureEnhancer(config)
        self.decoder = Decoder(config)
        if init:
            nn.init.normal_(self.level_embed)

    def forward(
        self,
        image: ImageFeatures,
        text: TextFeatures,
        box_heads: Sequence[nn.Module],
        query_index: Tensor | None = None,
        denoise: DenoisingQueries | None = None,
    ) -> Decoded:
        """Enhances image and text features, selects the queries and decodes them.

        Args:
            image: the projected multi-scale image features.
            text: the encoded prompt.
            box_heads: each decoder layer's box head (refines the reference boxes).
            query_index: (B, Q) image tokens to decode instead of the best-scoring ones.
            denoise: denoising queries to decode before the matching ones (training only); the
                matching queries' results are the same with or without them.
        """
        shapes = image.shapes
        source, padding = image.flatten()  # (B, S, D), (B, S) True on padding
        ratios = image.valid_ratios(torch.float32)  # (B, nL, 2), float32 in any precision
        low = next(self.encoder.parameters()).dtype  # see GroundingDino.set_precision
        memory, memory_text = self.encoder(
            source.to(low),
            self._positions(image, source.dtype).to(low),
            shapes,
            ratios,
            padding,
            text.features.to(low),
            text.padding_mask,
            text.self_attention,
            text.position_ids,
        )
        high = self.enc_output.weight.dtype
        memory, memory_text = memory.to(high), memory_text.to(high)
        queries, references, index, chosen = select_queries(
            self, memory, padding, shapes, memory_text, text.padding_mask, query_index
        )
        padded = query_padding(padding, index)  # (B, Q) or None: queries on padding, see query_selection
        allowed = None if padded is None else ~padded[:, None, None, :]  # (B, 1, 1, Q)
        # Both the original and transformers detach the initial reference boxes: the decoder's
        # losses do not train the proposal head (the encoder-proposal loss does, see Decoded).
        starts = references.detach()
        n = 0
        if denoise is not None:
            n = denoise.boxes.shape[1]
            content = denoise.token_maps[..., : memory_text.shape[1]].to(memory_text.dtype) @ memory_text  # (B, N, D)
            queries = torch.cat([content.to(queries.dtype), queries], 1)  # (B, N + Q, D)
            starts = torch.cat([denoise.boxes.to(starts.dtype), starts], 1)  # (B, N + Q, 4)
            allowed = denoise_attention(denoise, padded, queries.shape[1] - n)
        hidden, refs = self.decoder(
            queries, starts, memory, padding, shapes, ratios, memory_text, text.padding_mask, box_heads, allowed
        )
        if not n:
            return Decoded(hidden, refs, memory_text, index, chosen, references, padded)
        return Decoded(
            hidden[:, :, n:],
            refs[:, :, n:],
            memory_text,
            index,
            chosen,
            references,
            padded,
            denoise_hidden=hidden[:, :, :n],
            denoise_references=refs[:, :, :n],
        )

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


def denoise_attention(denoise: DenoisingQueries, padded: Tensor | None, n_matching: int) -> Tensor:
    """(B, 1, N + Q, N + Q) the decoder's self-attention mask with N denoising queries first: a
    denoising query sees its own group and the matching queries; a matching query sees only the
    matching queries (so its result is the same without denoising); nobody sees padding slots."""
    b, n = denoise.valid.shape
    device = denoise.valid.device
    keys = torch.ones(b, n + n_matching, dtype=torch.bool, device=device)  # (B, N + Q) attendable
    keys[:, :n] = denoise.valid
    if padded is not None:
        keys[:, n:] = ~padded
    rows = torch.ones(n + n_matching, n + n_matching, dtype=torch.bool, device=device)  # (N + Q, N + Q)
    rows[:n, :n] = denoise.groups
    rows[n:, :n] = False
    return rows[None, None] & keys[:, None, None, :]
