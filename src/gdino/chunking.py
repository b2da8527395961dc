"""Running a ``ClassQuery`` on one image, chunk by chunk, and merging what the chunks find.

The image side (Swin and the input projections) is computed once by the caller; each chunk is a
pass of the feature enhancer and decoder over the same features with its own prompt. A chunk's
queries are its own boxes, so merging keeps every (query, chunk) pair as a candidate, with the
label ids of the full list. ``nms`` and ``top_k`` are small, dependency-free torch functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .boxes import box_iou
from .classes import ClassPrompt

if TYPE_CHECKING:
    from .detector import GroundingDinoForObjectDetection
    from .model.grounding_dino import ImageFeatures


@dataclass(frozen=True)
class ChunkScores:
    """One chunk's output on one image.

    Attributes:
        scores: (Q, C) class scores of each query for the chunk's C labels.
        boxes: (Q, 4) float32 (cx, cy, w, h) relative to the image.
        ids: (C,) int64 label ids (into the full list) of the columns of ``scores``.
    """

    scores: Tensor
    boxes: Tensor
    ids: Tensor


@dataclass(frozen=True)
class Candidates:
    """Boxes with one label each: (N, 4) relative (cx, cy, w, h), (N,) scores, (N,) int64 label ids."""

    boxes: Tensor
    scores: Tensor
    ids: Tensor

    def select(self, index: Tensor) -> Candidates:
        return Candidates(self.boxes[index], self.scores[index], self.ids[index])


def score_chunks(
    model: GroundingDinoForObjectDetection, features: ImageFeatures, prompts: Sequence[ClassPrompt]
) -> list[ChunkScores]:
    """Class scores of every query for each chunk; ``features`` is one image (``ImageFeatures.crop``)."""
    out = []
    for prompt in prompts:
        tokens = model.processor.tokenizer.encode([prompt.text])
        text = model.text_features(
            tokens.input_ids.to(model.device), tokens.attention_mask.to(model.device),
            tokens.token_type_ids.to(model.device),
        )  # fmt: skip
        logits, boxes, _ = model.detect_features(features, text)
        probs = logits[0].float().sigmoid()  # (Q, T), 0 past the prompt
        scores = probs @ prompt.positive_map(probs.shape[-1], probs.device).T  # (Q, C)
        ids = torch.tensor(prompt.ids, dtype=torch.long, device=probs.device)
        out.append(ChunkScores(scores, boxes[0].float(), ids))
    return out


def best_per_query(chunks: Sequence[ChunkScores]) -> Candidates:
    """Each query of each chunk with its best label (ties to the earlier label)."""
    scores, columns = zip(*(c.scores.max(-1) for c in chunks))
    return Candidates(
        torch.cat([c.boxes for c in chunks]),
        torch.cat(scores),
        torch.cat([c.ids[col] for c, col in zip(chunks, columns)]),
    )


def top_k(chunks: Sequence[ChunkScores], k: int) -> Candidates:
    """The k best (query, label) pairs over all chunks: a query may come back with several labels.

    This is the original repository's COCO protocol (top-k over the flattened query x class
    scores), run over every chunk. Sorted best first.
    """
    parts = []
    for c in chunks:
        flat = c.scores.flatten()  # (Q * C)
        values, index = flat.topk(min(k, flat.numel()))
        n_labels = c.scores.shape[1]
        parts.append(Candidates(c.boxes[index // n_labels], values, c.ids[index % n_labels]))
    merged = Candidates(*(torch.cat(t) for t in zip(*((p.boxes, p.scores, p.ids) for p in parts))))
    order = merged.scores.argsort(descending=True, stable=True)[:k]
    return merged.select(order)


# --------------------------------------------------------------------------- boxes


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; the kept indices, best score first.

    A box is dropped when its IoU with a better kept box is above ``iou_threshold``. Equal
    scores keep the earlier box.
    """
    order = scores.argsort(descending=True, stable=True)
    overlaps = (box_iou(boxes[order], boxes[order]) > iou_threshold).triu(1).cpu()  # (N, N)
    dropped = torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if not dropped[i]:
            dropped |= overlaps[i]
    return order[~dropped.to(order.device)]


def class_nms(boxes: Tensor, scores: Tensor, ids: Tensor, iou_threshold: float) -> Tensor:
    """``nms`` within each label id: boxes of different labels never suppress each other.

    Returns:
        The kept indices, best score first.
    """
    kept = [torch.nonzero(ids == label).flatten() for label in ids.unique()]
    kept = [group[nms(boxes[group], scores[group], iou_threshold)] for group in kept]
    index = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=boxes.device)
    return index[scores[index].argsort(descending=True, stable=True)]
