"""``Detections``: what ``detect`` returns, in numpy (shared by the PyTorch detector and ``gdino.runtime.onnx``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gdino.inference.masks import Masks


@dataclass(frozen=True)
class Detections:
    """What was found in one image, best first.

    Attributes:
        boxes: (N, 4) float32 (x0, y0, x1, y1) in pixels of the original image.
        scores: (N,) float32 in [0, 1].
        labels: N phrases of the prompt, e.g. "a remote control".
        label_ids: (N,) int64 index of each label's phrase in the prompt (of the label in a label list).
        image_size: (width, height) of the original image.
        masks: with a segmenter, each detection's mask at the original image's size (kept cropped
            to its bounds, see ``Masks``); None without one.
        mask_scores: (N,) float32, the segmenter's predicted IoU of each mask; None without masks.
        track_ids: (N,) int64, each detection's track across a video's frames
            (``gdino.inference.video_tracking``); None outside tracking.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]
    label_ids: np.ndarray
    image_size: tuple[int, int]
    masks: Masks | None = None
    mask_scores: np.ndarray | None = None
    track_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.masks is None) != (self.mask_scores is None):
            raise ValueError("masks and mask_scores go together: give both or neither")
        if self.masks is not None and self.mask_scores is not None:
            if len(self.masks) != len(self.labels) or len(self.mask_scores) != len(self.labels):
                raise ValueError(
                    f"{len(self.labels)} detections need as many masks and mask scores, "
                    f"got {len(self.masks)} and {len(self.mask_scores)}"
                )
            if self.masks.image_size != self.image_size:
                raise ValueError(f"masks of a {self.masks.image_size} image for a {self.image_size} one")

    def with_masks(self, masks: Masks, scores: np.ndarray) -> Detections:
        """These detections with a mask (and its score) each."""
        return replace(self, masks=masks, mask_scores=np.asarray(scores, np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def to_supervision(self) -> Any:
        """These detections as ``supervision.Detections`` (``gdino.inference.supervision_detections``),
        masks kept cropped; needs supervision (``pip install supervision``)."""
        from gdino.inference.supervision_detections import to_supervision

        return to_supervision(self)

    def to_list(self, decimals: int = 2) -> list[dict[str, Any]]:
        """JSON-ready detections: ``[{"box": [x0, y0, x1, y1], "score", "label", "label_id"}]``;
        with masks also ``"mask"`` (COCO compressed RLE, ``{"size": [h, w], "counts": str}``) and
        ``"mask_score"``; with track ids also ``"track_id"``."""
        records = [
            {
                "box": [round(float(v), decimals) for v in box],
                "score": round(float(score), 4),
                "label": label,
                "label_id": int(label_id),
            }
            for box, score, label, label_id in zip(self.boxes, self.scores, self.labels, self.label_ids)
        ]
        if self.masks is not None and self.mask_scores is not None:
            for record, rle, mask_score in zip(records, self.masks.to_rle(), self.mask_scores):
                record["mask"] = rle
                record["mask_score"] = round(float(mask_score), 4)
        if self.track_ids is not None:
            for record, track_id in zip(records, self.track_ids):
                record["track_id"] = int(track_id)
        return records
