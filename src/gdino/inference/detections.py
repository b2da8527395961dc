"""``Detections``: what ``detect`` returns, in numpy (shared by the PyTorch detector and ``gdino.runtime.onnx``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Detections:
    """What was found in one image, best first.

    Attributes:
        boxes: (N, 4) float32 (x0, y0, x1, y1) in pixels of the original image.
        scores: (N,) float32 in [0, 1].
        labels: N phrases of the prompt, e.g. "a remote control".
        label_ids: (N,) int64 index of each label's phrase in the prompt (of the label in a label list).
        image_size: (width, height) of the original image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]
    label_ids: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.labels)

    def to_list(self, decimals: int = 2) -> list[dict[str, Any]]:
        """JSON-ready detections: ``[{"box": [x0, y0, x1, y1], "score", "label", "label_id"}]``."""
        return [
            {
                "box": [round(float(v), decimals) for v in box],
                "score": round(float(score), 4),
                "label": label,
                "label_id": int(label_id),
            }
            for box, score, label, label_id in zip(self.boxes, self.scores, self.labels, self.label_ids)
        ]
