"""How well two runs of the detector agree: used by the precision tests and bench/compare.py.

Reduced precision (or the reference's different order of operations) can reorder the top-900
proposals, whose scores nearly tie, so queries are matched by box, not by slot.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gdino.inference.postprocess import box_iou
from gdino.utils.boxes import cxcywh_to_xyxy

TOP_K = 100  # queries compared for detection agreement
MIN_IOU, MAX_SCORE_DIFF = 0.9, 0.02  # what the speed issue asks of a reduced-precision run


def match_top_queries(
    base_logits: Tensor, base_boxes: Tensor, other_logits: Tensor, other_boxes: Tensor, top_k: int = TOP_K
) -> dict[str, Any]:
    """Matches each image's ``top_k`` best queries of the base run to the other run's queries.

    The base run's queries, best first (score = highest token probability), each take the not yet
    taken query of the other run whose box overlaps theirs most (IoU).

    Args:
        base_logits, other_logits: (B, Q, T) logits; base_boxes, other_boxes: (B, Q, 4) cx, cy, w, h.

    Returns:
        min_iou and max_score_diff over the matched pairs, same_query (pairs that are the same
        slot), pairs, nan_queries (queries with a NaN in either run) and ok (no NaN, and the
        bounds MIN_IOU and MAX_SCORE_DIFF met).
    """
    base_logits, other_logits = base_logits.float(), other_logits.float()
    base_boxes, other_boxes = base_boxes.float(), other_boxes.float()
    nan_queries = int(_broken(base_logits, base_boxes).sum() + _broken(other_logits, other_boxes).sum())
    min_iou, max_diff, same, pairs = 1.0, 0.0, 0, 0
    for b in range(base_logits.shape[0]):
        s0 = base_logits[b].sigmoid().max(-1).values
        s1 = other_logits[b].sigmoid().max(-1).values.nan_to_num(nan=float("inf"))
        order = s0.nan_to_num(nan=-1.0).argsort(descending=True)[:top_k]
        iou = torch.from_numpy(
            box_iou(
                cxcywh_to_xyxy(base_boxes[b][order]).double().numpy(), cxcywh_to_xyxy(other_boxes[b]).double().numpy()
            )
        )  # (k, Q)
        iou = iou.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        taken = torch.zeros(iou.shape[1], dtype=torch.bool)
        for i, q in enumerate(order.tolist()):
            row = iou[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            taken[j] = True
            min_iou = min(min_iou, float(row[j]))
            max_diff = max(max_diff, abs(float(s0[q] - s1[j])))
            same += int(j == q)
            pairs += 1
    ok = nan_queries == 0 and min_iou >= MIN_IOU and max_diff <= MAX_SCORE_DIFF
    return {
        "min_iou": min_iou,
        "max_score_diff": max_diff,
        "same_query": same,
        "pairs": pairs,
        "nan_queries": nan_queries,
        "ok": ok,
    }


def selection_overlap(base_index: Tensor, other_index: Tensor) -> dict[str, Any]:
    """How many of the base run's selected image tokens (B, Q) the other run selected, and in the same slot."""
    shared = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(base_index, other_index))
    return {"shared_tokens": shared, "same_slot": int((base_index == other_index).sum()), "queries": base_index.numel()}


def _broken(logits: Tensor, boxes: Tensor) -> Tensor:
    """(B, Q) True where a query's logits hold a NaN or its box is not finite (logits are -inf past the text)."""
    return logits.isnan().any(-1) | ~boxes.isfinite().all(-1)
