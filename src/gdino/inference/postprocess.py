"""The one decode: raw outputs (token logits and relative boxes) -> ``Detections``, in numpy.

Both the PyTorch detector (``gdino.inference.detector``) and the torch-free runtime
(``gdino.runtime.onnx``) hand each pass's ``(Q, T)`` logits and ``(Q, 4)`` boxes, as float32 numpy
arrays, to the functions here, so the rules that decide what a user gets exist once:

- a phrase prompt is scored phrase by phrase: a box's score is its best token's, its phrase the one
  holding that token (``phrase_detections``);
- a label list is scored label by label (the mean probability of a label's tokens), in chunks of
  at most ``max_text_len`` tokens; a chunk's queries are its own boxes, so merging keeps every
  (query, chunk) pair as a candidate (``Candidates``) with the label ids of the full list: its
  best label (``best_per_query``, for ``detect``) or the k best (query, label) pairs (``top_k``, the
  COCO protocol); thresholds, class-wise NMS and pixel boxes then give the ``Detections``
  (``class_detections``).

Post-processing is small next to the model (a (900, 256) array per pass), so numpy on the CPU is
no cost on any device. Nothing here runs a model or imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gdino.inference.detections import Detections
from gdino.processing.classes import ClassPrompt
from gdino.processing.text import PromptError


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic; -inf gives 0."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float32)))).astype(np.float32)


def to_pixels(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) relative (cx, cy, w, h) -> float32 (x0, y0, x1, y1) in pixels of a (width, height) image."""
    cx, cy, w, h = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).T
    width, height = size
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)  # (N, 4)
    return (xyxy * np.array([width, height, width, height], dtype=np.float32)).astype(np.float32)


# --------------------------------------------------------------------------- overlap and NMS


def _intersections(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, M) intersection areas of (N, 4) and (M, 4) xyxy boxes, with their (N,) and (M,) areas."""
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    corners = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    return corners.clip(min=0).prod(-1), area_a, area_b


def _ratio(inter: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """float32 ``inter / denominator``; 0 where the denominator is empty."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(denominator > 0, inter / np.maximum(denominator, np.finfo(np.float32).tiny), 0.0)
    return ratio.astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over union of (N, 4) and (M, 4) xyxy boxes; 0 where the union is empty."""
    inter, area_a, area_b = _intersections(a, b)
    return _ratio(inter, area_a[:, None] + area_b[None, :] - inter)


def box_ios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection over the smaller box's area of (N, 4) and (M, 4) xyxy boxes; 0 where the
    smaller box is empty. 1 when one box holds the other (SAHI's "IOS", for merging tiles' boxes)."""
    inter, area_a, area_b = _intersections(a, b)
    return _ratio(inter, np.minimum(area_a[:, None], area_b[None, :]))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; the kept indices (int64), best score first.

    A box is dropped when its IoU with a better kept box is above ``iou_threshold``. Equal
    scores keep the earlier box.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    overlaps = np.triu(box_iou(boxes[order], boxes[order]) > iou_threshold, 1)  # (N, N)
    dropped = np.zeros(len(order), dtype=bool)
    for i in range(len(order)):
        if not dropped[i]:
            dropped |= overlaps[i]
    return order[~dropped].astype(np.int64)


def class_nms(boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """``nms`` within each label id: boxes of different labels never suppress each other.

    Returns:
        The kept indices (int64), best score first.
    """
    kept = []
    for label in np.unique(ids):
        group = np.nonzero(ids == label)[0]
        kept.append(group[nms(boxes[group], scores[group], iou_threshold)])
    index = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return index[np.argsort(-scores[index], kind="stable")].astype(np.int64)


# --------------------------------------------------------------------------- phrases


def phrase_scores(token_scores: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """(..., P) score of each phrase: the max of the (..., T) token scores over its tokens.

    Raises:
        PromptError: no phrase at all (a prompt of separators only).
        ValueError: a span beyond the token scores.
    """
    if len(spans) == 0:
        raise PromptError("the prompt has no phrase (only separators such as '.')")
    if spans[-1][1] > token_scores.shape[-1]:
        raise ValueError(f"span {spans[-1]} is beyond the {token_scores.shape[-1]} token scores")
    return np.stack([token_scores[..., s:e].max(-1) for s, e in spans], -1)


def phrase_for_tokens(token_scores: np.ndarray, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The one phrase each box belongs to: the phrase holding its best-scoring token.

    Returns:
        ``(index, score)``, both ``(...)``: the phrase index (int64, into ``spans``) and the
        phrase's score. Ties go to the earlier phrase.
    """
    scores = phrase_scores(token_scores, spans)
    return scores.argmax(-1).astype(np.int64), scores.max(-1)


def phrase_detections(
    logits: np.ndarray,
    boxes: np.ndarray,
    spans: list[tuple[int, int]],
    names: list[str],
    size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
) -> Detections:
    """One image's queries for a phrase prompt -> thresholded, labelled, sorted detections in pixels.

    Args:
        logits: (Q, T) the queries' token logits (-inf past the prompt); boxes: (Q, 4) relative
            (cx, cy, w, h).
        spans: the phrases' token ranges; names: their texts.
        size: (width, height) of the image.
    """
    probs = sigmoid(logits)  # (Q, T), 0 past the prompt
    best = probs.max(-1)
    phrase, phrase_score = phrase_for_tokens(probs, spans)
    keep = np.nonzero((best > box_threshold) & (phrase_score >= text_threshold))[0]
    keep = keep[np.argsort(-best[keep], kind="stable")]
    label_ids = phrase[keep]
    return Detections(
        boxes=to_pixels(boxes[keep], size),
        scores=best[keep].astype(np.float32),
        labels=tuple(names[i] for i in label_ids),
        label_ids=label_ids,
        image_size=size,
    )


# --------------------------------------------------------------------------- label lists


@dataclass(frozen=True)
class ChunkScores:
    """One chunk's output on one image.

    Attributes:
        scores: (Q, C) float32 class scores of each query for the chunk's C labels.
        boxes: (Q, 4) float32 (cx, cy, w, h) relative to the image.
        ids: (C,) int64 label ids (into the full list) of the columns of ``scores``.
    """

    scores: np.ndarray
    boxes: np.ndarray
    ids: np.ndarray


def chunk_scores(logits: np.ndarray, boxes: np.ndarray, prompt: ClassPrompt) -> ChunkScores:
    """(Q, T) token logits of one chunk's pass -> each query's score for each of the chunk's labels
    (the mean probability of the label's tokens)."""
    probs = sigmoid(logits)  # (Q, T), 0 past the prompt
    scores = probs @ prompt.positive_weights(probs.shape[-1]).T  # (Q, C)
    return ChunkScores(scores.astype(np.float32), np.asarray(boxes, dtype=np.float32), np.asarray(prompt.ids, np.int64))


@dataclass(frozen=True)
class Candidates:
    """Boxes with one label each: (N, 4) relative (cx, cy, w, h), (N,) scores, (N,) int64 label ids."""

    boxes: np.ndarray
    scores: np.ndarray
    ids: np.ndarray

    def select(self, index: np.ndarray) -> Candidates:
        return Candidates(self.boxes[index], self.scores[index], self.ids[index])


def best_per_query(chunks: Sequence[ChunkScores]) -> Candidates:
    """Each query of each chunk with its best label (ties to the earlier label)."""
    columns = [c.scores.argmax(-1) for c in chunks]
    return Candidates(
        np.concatenate([c.boxes for c in chunks]),
        np.concatenate([c.scores[np.arange(len(col)), col] for c, col in zip(chunks, columns)]),
        np.concatenate([c.ids[col] for c, col in zip(chunks, columns)]),
    )


def top_k(chunks: Sequence[ChunkScores], k: int) -> Candidates:
    """The k best (query, label) pairs over all chunks: a query may come back with several labels.

    This is the original repository's COCO protocol (top-k over the flattened query x class
    scores), run over every chunk. Sorted best first (ties to the earlier pair).
    """
    parts = []
    for c in chunks:
        flat = c.scores.reshape(-1)  # (Q * C)
        index = np.argsort(-flat, kind="stable")[: min(k, flat.size)]
        n_labels = c.scores.shape[1]
        parts.append(Candidates(c.boxes[index // n_labels], flat[index], c.ids[index % n_labels]))
    merged = Candidates(*(np.concatenate(t) for t in zip(*((p.boxes, p.scores, p.ids) for p in parts))))
    return merged.select(np.argsort(-merged.scores, kind="stable")[:k])


def class_detections(
    found: Candidates, names: tuple[str, ...], size: tuple[int, int], box_threshold: float, nms_threshold: float | None
) -> Detections:
    """Candidates with label-level scores -> thresholded, optionally NMS-ed, sorted detections in pixels."""
    found = found.select(np.nonzero(found.scores > box_threshold)[0])
    xyxy = to_pixels(found.boxes, size)
    if nms_threshold is None:
        order = np.argsort(-found.scores, kind="stable")
    else:
        order = class_nms(xyxy, found.scores, found.ids, nms_threshold)
    label_ids = found.ids[order].astype(np.int64)
    return Detections(
        boxes=xyxy[order],
        scores=found.scores[order].astype(np.float32),
        labels=tuple(names[i] for i in label_ids),
        label_ids=label_ids,
        image_size=size,
    )


def nms_detections(found: Detections, nms_threshold: float) -> Detections:
    """``found`` less the boxes that overlap a better box of the same label by more than the threshold."""
    keep = class_nms(found.boxes, found.scores, found.label_ids, nms_threshold)
    return Detections(
        found.boxes[keep],
        found.scores[keep],
        tuple(found.labels[i] for i in keep),
        found.label_ids[keep],
        found.image_size,
    )
