"""How well a shapes segmenter does: the mean mask IoU of ground-truth box prompts on generated scenes.

Masks are predicted as inference makes them, through ``gdino.inference.segmenter.Segmenter``: the
image preprocessed as SAM 2's processor does, the boxes scaled into the square input, the
single-mask logits resized bilinearly to the original image's size and thresholded at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gdino.inference.segmenter import Segmenter
from gdino.models.sam2.model import Sam2
from gdino.training.shapes import Scene


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """The IoU of two (H, W) bool masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def scene_ious(model: Sam2 | Segmenter, scenes: Sequence[Scene]) -> list[float]:
    """Every object's mask IoU, prompted with its ground-truth box, in scene order."""
    segmenter = model if isinstance(model, Segmenter) else Segmenter(model)
    found = []
    for scene in scenes:
        masks, _ = segmenter.segment(scene.image, scene.boxes)
        found += [iou(masks.mask(k), truth) for k, truth in enumerate(scene.masks)]
    return found
