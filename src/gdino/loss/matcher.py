"""Hungarian matching of predictions to targets, as DETR and transformers' Grounding DINO match.

Each target box has a class: one of the prompt's phrases, given to the matcher as a normalised
map over the text tokens (each of the phrase's tokens 1 / its token count). The cost of giving a
target to a query is a weighted sum of

* a focal classification cost, averaged over the phrase's tokens,
* the L1 distance of the (cx, cy, w, h) boxes,
* minus their generalized IoU,

and ``scipy.optimize.linear_sum_assignment`` picks the one-to-one assignment of least total cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gdino.utils.boxes import cxcywh_to_xyxy, generalized_box_iou

FOCAL_ALPHA = 0.25  # the class cost's focal weights (fixed in DETR-family matchers)
FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class MatchCosts:
    """Weights of the three matching costs (the config's ``class_cost``, ``bbox_cost``, ``giou_cost``)."""

    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0


def class_cost(logits: Tensor, token_maps: Tensor) -> Tensor:
    """Focal classification cost of every query for every target.

    Args:
        logits: (Q, W) query-token logits (-inf on tokens that are not text).
        token_maps: (N, W) each target's phrase, 1 / (phrase length) on its tokens, 0 elsewhere.

    Returns:
        (Q, N) the positive-minus-negative focal cost, averaged over each target's tokens.
    """
    prob = logits.sigmoid()
    negative = (1 - FOCAL_ALPHA) * prob**FOCAL_GAMMA * -(1 - prob + 1e-8).log()
    positive = FOCAL_ALPHA * (1 - prob) ** FOCAL_GAMMA * -(prob + 1e-8).log()
    return (positive - negative) @ token_maps.t()


def match_cost(logits: Tensor, boxes: Tensor, token_maps: Tensor, target_boxes: Tensor, costs: MatchCosts) -> Tensor:
    """(Q, N) total cost of giving each of the N targets to each of the Q queries.

    Args:
        logits: (Q, W) query-token logits; boxes: (Q, 4) predicted (cx, cy, w, h).
        token_maps: (N, W) normalised phrase maps (see ``class_cost``); target_boxes: (N, 4) (cx, cy, w, h).
    """
    l1 = torch.cdist(boxes, target_boxes, p=1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
    cost = costs.bbox_cost * l1 + costs.class_cost * class_cost(logits, token_maps) - costs.giou_cost * giou
    # NaN or inf (a degenerate box) must not stop the assignment: such pairs are matched last.
    worst = torch.finfo(cost.dtype).max
    return torch.nan_to_num(cost, nan=worst, posinf=worst, neginf=worst)


@torch.no_grad()
def hungarian_match(
    logits: Tensor, boxes: Tensor, token_maps: list[Tensor], target_boxes: list[Tensor], costs: MatchCosts
) -> list[tuple[Tensor, Tensor]]:
    """The least-cost one-to-one assignment of queries to targets, image by image.

    Args:
        logits: (B, Q, W) query-token logits; boxes: (B, Q, 4) predicted (cx, cy, w, h).
        token_maps: per image, (N_i, W) float phrase maps of its targets, rows summing to 1.
        target_boxes: per image, (N_i, 4) target (cx, cy, w, h).

    Returns:
        Per image, (query indices, target indices), two int64 CPU tensors of length
        min(Q, N_i), ordered by query index.
    """
    try:
        from scipy.optimize import linear_sum_assignment  # the train extra; imported when training
    except ImportError as e:
        raise ImportError("the training loss needs scipy: pip install 'gdino[train]'") from e

    matches = []
    for image_logits, image_boxes, maps, targets in zip(logits, boxes, token_maps, target_boxes):
        if len(targets) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            matches.append((empty, empty))
            continue
        cost = match_cost(image_logits.float(), image_boxes.float(), maps.float(), targets.float(), costs)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return matches
