"""Running a ``ClassQuery`` on one image, chunk by chunk, and merging what the chunks find.

The image side (Swin and the input projections) is computed once by the caller; each chunk is a
pass of the feature enhancer and decoder over the same features with its own prompt. A chunk's
queries are its own boxes, so merging keeps every (query, chunk) pair as a candidate, with the
label ids of the full list. ``nms`` and ``top_k`` are small, dependency-free torch functions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .boxes import box_iou
from .processing.classes import ClassPrompt

if TYPE_CHECKING:
    from .detector import GroundingDinoForObjectDetection
    from .model.grounding_dino import ImageFeatures

log = logging.getLogger(__name__)

MANY_CHUNKS = 8  # from this many passes per image on, ``detect`` warns of the cost
ChunkCallback = Callable[[int, int], None]
_on_chunk: ContextVar[ChunkCallback | None] = ContextVar("gdino_on_chunk", default=None)


@contextmanager
def on_chunk(callback: ChunkCallback) -> Iterator[None]:
    """Calls ``callback(done, total)`` before each chunk of a label list and once after the last.

    It holds in this thread (or task) only. For progress (the command line) and for stopping between chunks (the server): an exception
    raised by the callback ends ``detect`` before the next pass.
    """
    token = _on_chunk.set(callback)
    try:
        yield
    finally:
        _on_chunk.reset(token)


@lru_cache(maxsize=64)
def _warn_cost(chunks: int, labels: int) -> None:
    """Says once per list size what a huge label list costs."""
    log.warning("%d labels need %d passes of the encoder and decoder per image (each up to 256 tokens); "
                "a shorter list is faster", labels, chunks)  # fmt: skip


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
    callback = _on_chunk.get()
    if len(prompts) >= MANY_CHUNKS:
        _warn_cost(len(prompts), sum(len(p.ids) for p in prompts))
    out = []
    for done, prompt in enumerate(prompts):
        if callback is not None:
            callback(done, len(prompts))
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
    if callback is not None:
        callback(len(prompts), len(prompts))
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
