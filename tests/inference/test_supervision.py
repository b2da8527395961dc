"""``Detections.to_supervision``: supervision's ``Detections`` with the same boxes, scores, labels and masks."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks


def found(with_masks: bool = True) -> Detections:
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 5:20, 10:30] = True
    masks[0, 8:12, 15:20] = False  # a hole
    masks[1, 30:40, 50:60] = True  # touching the bottom-right corner
    # masks[2] stays empty
    detections = Detections(
        np.array([[10, 5, 30, 20], [50, 30, 60, 40], [0, 0, 5, 5]], np.float32),
        np.array([0.9, 0.8, 0.4], np.float32),
        ("cat", "remote control", "cat"),
        np.array([0, 1, 0]),
        (60, 40),
    )
    if not with_masks:
        return detections
    return detections.with_masks(Masks.from_dense(masks), np.array([0.95, 0.7, 0.1]))


def test_to_supervision_keeps_everything() -> None:
    sv = pytest.importorskip("supervision")
    ours = found()
    theirs = ours.to_supervision()
    assert isinstance(theirs, sv.Detections) and len(theirs) == 3
    np.testing.assert_array_equal(theirs.xyxy, ours.boxes)
    np.testing.assert_array_equal(theirs.confidence, ours.scores)
    np.testing.assert_array_equal(theirs.class_id, [0, 1, 0])
    assert list(theirs.data["class_name"]) == ["cat", "remote control", "cat"]
    np.testing.assert_allclose(theirs.data["mask_score"], [0.95, 0.7, 0.1])
    dense = theirs.mask.to_dense() if hasattr(theirs.mask, "to_dense") else np.asarray(theirs.mask)
    np.testing.assert_array_equal(dense, ours.masks.dense())
    assert theirs.tracker_id is None


def test_to_supervision_without_masks_and_empty() -> None:
    pytest.importorskip("supervision")
    theirs = found(with_masks=False).to_supervision()
    assert theirs.mask is None and len(theirs) == 3
    nothing = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), (), np.zeros(0, np.int64), (60, 40))
    empty = nothing.with_masks(Masks.empty((60, 40)), np.zeros(0)).to_supervision()
    assert len(empty) == 0


def test_without_supervision_the_error_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)  # import supervision -> ImportError
    with pytest.raises(ImportError, match="pip install supervision"):
        found().to_supervision()
