"""Language-guided query selection: the image tokens most similar to the text become the queries.

Every image token proposes a box centred on itself (size growing with the level); the
``num_queries`` tokens whose best text-token similarity is highest give the decoder its initial
reference boxes, refined by the proposal head. Padding tokens are never selected, so a padded
image selects the same queries as the same image alone.

An image with fewer tokens than ``num_queries`` (aspect ratios of about 44:1 and beyond, e.g. a
5000x10 text line gives ~300 tokens) decodes all its tokens: the batch gets
``min(num_queries, most tokens of one image)`` queries, as many as the image would get alone.
Padding is not invented for the missing ones, because every query attends to every other in the
decoder and padding queries would change the real ones. In a padded batch an image with fewer
tokens than that has queries on padding tokens; ``query_padding`` marks them (the decoder's
self-attention ignores them and the detector gives them -inf logits).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.heads import MLP, ClassHead


class SelectionParts(Protocol):
    """What query selection uses of the transformer (``gdino.models.grounding_dino.transformer.Transformer``)."""

    config: GroundingDinoConfig
    enc_output: nn.Linear
    enc_output_norm: nn.LayerNorm
    enc_out_bbox_embed: MLP
    enc_out_class_embed: ClassHead
    tgt_embed: nn.Embedding


def token_proposals(padding_mask: Tensor, spatial_shapes: list[tuple[int, int]], dtype: torch.dtype) -> Tensor:
    """One box per image token, in logit space.

    Args:
        padding_mask: (B, S) True on padding tokens.
        spatial_shapes: (H_l, W_l) of each level; S = sum of H_l * W_l.

    Returns:
        (B, S, 4) inverse-sigmoid (cx, cy, w, h) normalised to each image's valid extent;
        +inf on padding and on proposals too close to the border (outside (0.01, 0.99)).
    """
    batch = padding_mask.shape[0]
    proposals, start = [], 0
    for level, (h, w) in enumerate(spatial_shapes):
        valid = ~padding_mask[:, start : start + h * w].view(batch, h, w)
        valid_h = valid[:, :, 0].sum(1).to(dtype)
        valid_w = valid[:, 0, :].sum(1).to(dtype)
        ys = torch.arange(h, dtype=dtype, device=padding_mask.device)
        xs = torch.arange(w, dtype=dtype, device=padding_mask.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([grid_x, grid_y], -1)[None]  # (1, h, w, 2)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        centres = (grid + 0.5) / scale  # (B, h, w, 2)
        sizes = torch.full_like(centres, 0.05 * 2.0**level)
        proposals.append(torch.cat([centres, sizes], -1).view(batch, h * w, 4))
        start += h * w
    boxes = torch.cat(proposals, 1)  # (B, S, 4)
    usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    logits = torch.log(boxes / (1 - boxes))
    return logits.masked_fill(~usable, float("inf"))


def proposal_scores(
    transformer: SelectionParts,
    memory: Tensor,
    padding_mask: Tensor,
    proposals: Tensor,
    text: Tensor,
    text_padding_mask: Tensor,
) -> tuple[Tensor, Tensor]:
    """The score query selection ranks every image token by.

    Args:
        memory: (B, S, D) enhanced image tokens; padding_mask (B, S) True on padding.
        proposals: (B, S, 4) from ``token_proposals`` (+inf where unusable).
        text: (B, T, D) enhanced text tokens; text_padding_mask (B, T) True on padding.

    Returns:
        tokens (B, S, D): the normalised encoder output; scores (B, S): each token's best
        text-token logit, -inf on padding.
    """
    t = transformer
    usable = torch.isfinite(proposals).all(-1, keepdim=True)
    tokens = t.enc_output_norm(t.enc_output(memory.masked_fill(~usable, 0.0)))  # (B, S, D)
    scores = t.enc_out_class_embed(tokens, text, text_padding_mask, t.config.max_text_len).max(-1).values
    return tokens, scores.masked_fill(padding_mask, float("-inf"))  # (B, S, D), (B, S)


def select_queries(
    transformer: SelectionParts,
    memory: Tensor,
    padding_mask: Tensor,
    spatial_shapes: list[tuple[int, int]],
    text: Tensor,
    text_padding_mask: Tensor,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Picks the decoder's queries and initial reference boxes.

    Args:
        memory: (B, S, D) enhanced image tokens.
        padding_mask: (B, S) True on padding tokens.
        text: (B, T, D) enhanced text tokens; text_padding_mask (B, T) True on padding.
        index: (B, Q) image tokens (Q as ``query_count``) to use instead of the best-scoring ones, in slot order (to
            compare two runs, e.g. two precisions, on the same queries); None selects by score.

    Returns:
        queries (B, Q, D): the learnt query embeddings; references (B, Q, 4): sigmoid boxes, not
        detached (the encoder-proposal loss trains the proposal head through them); index (B, Q):
        the image token (position in the flattened levels) each query came from; chosen (B, Q, D):
        those tokens' normalised encoder output (the proposal head's input). Q is
        ``query_count``: ``num_queries`` unless no image of the batch has that many tokens.
    """
    t = transformer
    proposals = token_proposals(padding_mask, spatial_shapes, memory.dtype)
    tokens, scores = proposal_scores(t, memory, padding_mask, proposals, text, text_padding_mask)
    count = query_count(padding_mask, t.config.num_queries)
    if index is None:
        index = scores.topk(count, dim=1).indices
    elif index.shape != (memory.shape[0], count):
        raise ValueError(f"query index must be (batch, {count}), not {tuple(index.shape)}")
    top = index[..., None]  # (B, Q, 1)
    # The proposal head is per token: run it on the selected tokens only.
    chosen = torch.gather(tokens, 1, top.expand(-1, -1, tokens.shape[-1]))  # (B, Q, D)
    references = (t.enc_out_bbox_embed(chosen) + torch.gather(proposals, 1, top.expand(-1, -1, 4))).sigmoid()
    queries = t.tgt_embed.weight[None, :count].expand(memory.shape[0], -1, -1)
    return queries, references, index, chosen


def query_count(padding_mask: Tensor, num_queries: int) -> int:
    """How many queries a batch decodes: ``num_queries``, or fewer when no image has that many tokens.

    Args:
        padding_mask: (B, S) True on padding tokens.
    """
    if torch.compiler.is_compiling():  # export: no data-dependent size; exported images are never padded
        return torch.sym_min(num_queries, padding_mask.shape[1])
    return min(num_queries, int((~padding_mask).sum(1).max()))


def query_padding(padding_mask: Tensor, index: Tensor) -> Tensor | None:
    """(B, Q) True where a query was selected from a padding token (see the module docstring), or None if none was."""
    padded = torch.gather(padding_mask, 1, index)
    if torch.compiler.is_compiling():  # export: no data-dependent branch (masking with no True is a no-op)
        return padded
    return padded if bool(padded.any()) else None
