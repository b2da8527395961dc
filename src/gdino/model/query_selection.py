"""Language-guided query selection: the image tokens most similar to the text become the queries.

Every image token proposes a box centred on itself (size growing with the level); the
``num_queries`` tokens whose best text-token similarity is highest give the decoder its initial
reference boxes, refined by the proposal head. Padding tokens are never selected, so a padded
image selects the same queries as the same image alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .heads import contrastive_logits

if TYPE_CHECKING:
    from .grounding_dino import Transformer


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
    transformer: Transformer,
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
    scores = contrastive_logits(tokens, text, text_padding_mask, t.config.max_text_len).max(-1).values
    return tokens, scores.masked_fill(padding_mask, float("-inf"))  # (B, S, D), (B, S)


def select_queries(
    transformer: Transformer,
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
        index: (B, Q) image tokens to use instead of the best-scoring ones, in slot order (to
            compare two runs, e.g. two precisions, on the same queries); None selects by score.

    Returns:
        queries (B, Q, D): the learnt query embeddings; references (B, Q, 4): sigmoid boxes, not
        detached (the encoder-proposal loss trains the proposal head through them); index (B, Q):
        the image token (position in the flattened levels) each query came from; chosen (B, Q, D):
        those tokens' normalised encoder output (the proposal head's input).
    """
    t = transformer
    proposals = token_proposals(padding_mask, spatial_shapes, memory.dtype)
    tokens, scores = proposal_scores(t, memory, padding_mask, proposals, text, text_padding_mask)
    if index is None:
        index = scores.topk(t.config.num_queries, dim=1).indices
    elif index.shape != (memory.shape[0], t.config.num_queries):
        raise ValueError(f"query index must be (batch, {t.config.num_queries}), not {tuple(index.shape)}")
    top = index[..., None]  # (B, Q, 1)
    # The proposal head is per token: run it on the selected tokens only.
    chosen = torch.gather(tokens, 1, top.expand(-1, -1, tokens.shape[-1]))  # (B, Q, D)
    references = (t.enc_out_bbox_embed(chosen) + torch.gather(proposals, 1, top.expand(-1, -1, 4))).sigmoid()
    queries = t.tgt_embed.weight[None].expand(memory.shape[0], -1, -1)
    return queries, references, index, chosen
