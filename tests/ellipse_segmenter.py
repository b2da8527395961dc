"""A stand-in with the ``Segmenter`` interface (``segment``, ``add_masks``): each box's mask is the
ellipse inscribed in it, its score a fixed function of the box. What the apps do with masks is
tested with it; the real segmenter's masks are tested in tests/inference and tests/models."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks, crop_mask


def ellipse(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the ellipse inscribed in ``box`` (x0 y0 x1 y1, clipped to the image), pixel centres inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # (H, W) pixel centres
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


class EllipseSegmenter:
    """Masks = the ellipse in each box; score = 0.5 + box area / (2 x image area). Counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # boxes per segment() call
        self.sizes: list[tuple[int, int]] = []  # (width, height) of each call's image

    def segment(self, image: Any, boxes: np.ndarray) -> tuple[Masks, np.ndarray]:
        width, height = image.size if isinstance(image, Image.Image) else Image.open(image).size
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.calls.append(len(boxes))
        self.sizes.append((width, height))
        crops = [crop_mask(ellipse(box, width, height), (0, 0)) for box in boxes]
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        scores = (0.5 + areas / (2 * width * height)).astype(np.float32)
        return Masks.from_crops(crops, (width, height)), scores

    def add_masks(self, image: Any, found: Detections) -> Detections:
        return found.with_masks(*self.segment(image, found.boxes))
