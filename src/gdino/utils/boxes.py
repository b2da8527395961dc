"""Box formats and generalized IoU on tensors, for the processor, the loss and the matcher.

Overlap and non-maximum suppression on detections are numpy, in the one decode
(``gdino.inference.postprocess``)."""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def to_pixels(boxes: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """(..., 4) (cx, cy, w, h) relative to an image -> (x0, y0, x1, y1) in its pixels.

    ``width`` and ``height`` are numbers, or tensors that broadcast against ``boxes[..., 0]``
    (``(B, 1)`` for a batch of ``(B, Q, 4)`` boxes of images of different sizes).
    """
    xyxy = cxcywh_to_xyxy(boxes)
    w = torch.as_tensor(width, device=xyxy.device)
    h = torch.as_tensor(height, device=xyxy.device)
    return xyxy * torch.stack([w, h, w, h], -1)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) generalized IoU (Rezatofighi et al. 2019) of (N, 4) and (M, 4) xyxy boxes, in [-1, 1].

    IoU minus the fraction of the smallest enclosing box that the union does not cover. Boxes
    must not be inverted (x1 >= x0, y1 >= y0); a box of zero area is allowed as long as the
    enclosing box has some area.
    """
    if bool((a[:, 2:] < a[:, :2]).any()) or bool((b[:, 2:] < b[:, :2]).any()):
        raise ValueError("generalized_box_iou needs (x0, y0, x1, y1) boxes with x1 >= x0 and y1 >= y0")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    outer = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])).prod(-1)
    return inter / union - (outer - union) / outer
