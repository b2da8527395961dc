"""``Detections`` -> supervision's ``sv.Detections`` (supervision is optional: ``pip install supervision``).

Boxes go to ``xyxy``, scores to ``confidence``, label ids to ``class_id``, track ids to
``tracker_id``, the labels to ``data["class_name"]`` (supervision's key for class names) and the
mask scores to ``data["mask_score"]``. Masks stay cropped: supervision's ``CompactMask`` (from
0.27) is built crop by crop, so a large image with many masks never becomes an (N, H, W) array;
an older supervision gets the dense (N, H, W) bool array it expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gdino.inference.masks import Masks

MISSING = "Detections.to_supervision needs supervision: pip install supervision"


class _Found(Protocol):
    """What is read of a ``Detections`` (named here, not imported: detections.py imports this module)."""

    @property
    def boxes(self) -> np.ndarray: ...
    @property
    def scores(self) -> np.ndarray: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def label_ids(self) -> np.ndarray: ...
    @property
    def masks(self) -> Masks | None: ...
    @property
    def mask_scores(self) -> np.ndarray | None: ...
    @property
    def track_ids(self) -> np.ndarray | None: ...


def to_supervision(found: _Found) -> Any:
    """``found`` as ``supervision.Detections``.

    Raises:
        ImportError: supervision is not installed (the message says how to install it).
    """
    try:
        import supervision as sv
    except ImportError as error:
        raise ImportError(MISSING) from error
    data: dict[str, Any] = {"class_name": np.array(found.labels, dtype=object).reshape(-1)}
    mask = None
    if found.masks is not None and found.mask_scores is not None:
        mask = compact_masks(sv, found.masks) if hasattr(sv, "CompactMask") else found.masks.dense()
        data["mask_score"] = np.asarray(found.mask_scores, np.float32)
    return sv.Detections(
        xyxy=np.asarray(found.boxes, np.float32).reshape(-1, 4),
        mask=mask,
        confidence=np.asarray(found.scores, np.float32),
        class_id=np.asarray(found.label_ids, np.int64),
        tracker_id=None if found.track_ids is None else np.asarray(found.track_ids, np.int64),
        data=data,
    )


def compact_masks(sv: Any, masks: Masks) -> Any:
    """``Masks`` -> ``sv.CompactMask`` of the same masks, one crop at a time."""
    width, height = masks.image_size
    if len(masks) == 0:
        return sv.CompactMask.from_dense(np.zeros((0, height, width), bool), np.zeros((0, 4)), (height, width))
    parts = []
    for crop, (x0, y0) in zip(masks.crops, masks.offsets):
        if crop.size == 0:  # an empty mask: one False pixel, as supervision stores one
            crop = np.zeros((1, 1), bool)
        h, w = crop.shape
        local = sv.CompactMask.from_dense(crop[None], np.array([[0, 0, w - 1, h - 1]], np.float32), (h, w))
        parts.append(local.with_offset(int(x0), int(y0), (height, width)))
    return sv.CompactMask.merge(parts)
