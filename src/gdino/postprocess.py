"""How candidates become ``Detections``: the merging of label chunks, thresholds and class-wise NMS.

A label list longer than one prompt is scored in chunks (``ChunkScores``, one per pass of the
encoder and decoder over the same image features; the detector runs them); a chunk's queries are
its own boxes, so merging keeps every (query, chunk) pair as a candidate (``Candidates``), with the
label ids of the full list: its best label (``best_per_query``, for ``detect``) or the k best
(query, label) pairs (``top_k``, the COCO protocol). Thresholds, class-wise NMS and pixel boxes
then give the ``Detections`` (``gdino.detections``, torch-free for the ONNX runtime). Nothing here
runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .boxes import class_nms, to_pixels
from .detections import Detections
from .processing.text import phrase_for_tokens


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


# --------------------------------------------------------------------------- to Detections


def phrase_detections(
    logits: Tensor,
    boxes: Tensor,
    spans: list[tuple[int, int]],
    names: list[str],
    size: tuple[int, int],
    box_threshold: float,
    text_threshold: float,
) -> Detections:
    """One image's queries for a phrase prompt -> thresholded, labelled, sorted detections in pixels.

    Args:
        logits: (Q, T) the queries' token logits; boxes: (Q, 4) relative (cx, cy, w, h).
        spans: the phrases' token ranges; names: their texts.
        size: (width, height) of the image.
    """
    probs = logits.float().sigmoid()  # (Q, T), 0 past the prompt (logits -inf there)
    best = probs.max(-1).values
    phrase, phrase_score = phrase_for_tokens(probs, spans)
    keep = (best > box_threshold) & (phrase_score >= text_threshold)
    order = best[keep].argsort(descending=True)
    width, height = size
    xyxy = to_pixels(boxes[keep][order].float(), width, height)
    label_ids = phrase[keep][order].cpu().numpy().astype(np.int64)
    return Detections(
        boxes=xyxy.cpu().numpy().astype(np.float32),
        scores=best[keep][order].cpu().numpy().astype(np.float32),
        labels=tuple(names[i] for i in label_ids),
        label_ids=label_ids,
        image_size=(width, height),
    )


def class_detections(
    found: Candidates, names: tuple[str, ...], size: tuple[int, int], box_threshold: float, nms_threshold: float | None
) -> Detections:
    """Candidates with label-level scores -> thresholded, optionally NMS-ed, sorted detections in pixels."""
    found = found.select(torch.nonzero(found.scores > box_threshold).flatten())
    width, height = size
    xyxy = to_pixels(found.boxes, width, height)
    if nms_threshold is None:
        order = found.scores.argsort(descending=True, stable=True)
    else:
        order = class_nms(xyxy, found.scores, found.ids, nms_threshold)
    label_ids = found.ids[order].cpu().numpy().astype(np.int64)
    return Detections(
        boxes=xyxy[order].cpu().numpy().astype(np.float32),
        scores=found.scores[order].cpu().numpy().astype(np.float32),
        labels=tuple(names[i] for i in label_ids),
        label_ids=label_ids,
        image_size=(width, height),
    )


def nms_detections(found: Detections, nms_threshold: float) -> Detections:
    """``found`` less the boxes that overlap a better box of the same label by more than the threshold."""
    keep = class_nms(
        torch.from_numpy(found.boxes), torch.from_numpy(found.scores), torch.from_numpy(found.label_ids), nms_threshold
    ).numpy()
    return Detections(found.boxes[keep], found.scores[keep], tuple(found.labels[i] for i in keep),
                      found.label_ids[keep], found.image_size)
