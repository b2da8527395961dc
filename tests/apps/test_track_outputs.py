"""gdino track's files (gdino.apps.track_outputs): the CVAT for video 1.1 XML in the structure CVAT
documents, MOTChallenge files a MOT library reads back, and JSON Lines records."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from gdino.apps.track_outputs import CVAT, JSONL, MOT_FOLDER, StreamedOutputs, cvat_xml, mot_names
from gdino.inference.detections import Detections
from gdino.inference.video_tracking import TrackedFrame

NAMES = ["red circle", "blue square"]


def _frame(index: int, tracks: list[tuple[int, int, list[float]]], detected: bool = True) -> TrackedFrame:
    """A frame with (track id, label id, box) tracks."""
    found = Detections(
        boxes=np.array([t[2] for t in tracks], np.float32).reshape(-1, 4),
        scores=np.full(len(tracks), 0.75, np.float32),
        labels=tuple(NAMES[t[1]] for t in tracks),
        label_ids=np.array([t[1] for t in tracks], np.int64),
        image_size=(320, 256),
        track_ids=np.array([t[0] for t in tracks], np.int64),
    )
    return TrackedFrame(index, index / 10, found, detected)


def _write(out: Path) -> None:
    # track 1 (red circle) in frames 0-1 and 4, track 2 (blue square) in frames 1-5; frame 3 carried
    frames = [
        _frame(0, [(1, 0, [10, 10, 30, 30])]),
        _frame(1, [(1, 0, [12, 10, 32, 30]), (2, 1, [100, 100, 140, 140])]),
        _frame(2, [(2, 1, [102, 100, 142, 140])]),
        _frame(3, [(2, 1, [104, 100, 144, 140])], detected=False),
        _frame(4, [(1, 0, [20, 10, 40, 30]), (2, 1, [106, 100, 146, 140])]),
        _frame(5, [(2, 1, [108, 100, 148, 140])]),
    ]
    outputs = StreamedOutputs(out, NAMES)
    for frame in frames:
        outputs.write(frame)
    outputs.close()
    (out / CVAT).write_text(cvat_xml(out / JSONL, NAMES, "clip.mp4"))


def test_jsonl_has_a_record_per_frame(tmp_path: Path) -> None:
    _write(tmp_path)
    records = [json.loads(line) for line in (tmp_path / JSONL).read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(6))
    assert records[1]["time"] == 0.1 and records[3]["detected"] is False
    assert records[1]["detections"][1] == {
        "box": [100.0, 100.0, 140.0, 140.0],
        "score": 0.75,
        "label": "blue square",
        "label_id": 1,
        "track_id": 2,
    }


def test_cvat_for_video_structure(tmp_path: Path) -> None:
    _write(tmp_path)
    root = ET.parse(tmp_path / CVAT).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task is not None
    assert task.findtext("size") == "6" and task.findtext("mode") == "interpolation"
    assert (task.findtext("start_frame"), task.findtext("stop_frame")) == ("0", "5")
    assert [e.text for e in task.findall("labels/label/name")] == NAMES
    assert (task.findtext("original_size/width"), task.findtext("original_size/height")) == ("320", "256")
    tracks = root.findall("track")
    assert [(t.get("id"), t.get("label")) for t in tracks] == [("0", "red circle"), ("1", "blue square")]
    red = [(b.get("frame"), b.get("outside"), b.get("keyframe")) for b in tracks[0].findall("box")]
    # seen 0-1, gone at 2 (outside), back at 4, gone at 5
    assert red == [("0", "0", "1"), ("1", "0", "1"), ("2", "1", "1"), ("4", "0", "1"), ("5", "1", "1")]
    blue = tracks[1].findall("box")
    assert [b.get("frame") for b in blue] == ["1", "2", "3", "4", "5"]  # to the last frame: no outside
    assert blue[2].get("keyframe") == "0"  # the carried frame is interpolated, not a key frame
    assert {k: blue[0].get(k) for k in ("xtl", "ytl", "xbr", "ybr", "occluded", "z_order")} == {
        "xtl": "100.00",
        "ytl": "100.00",
        "xbr": "140.00",
        "ybr": "140.00",
        "occluded": "0",
        "z_order": "0",
    }


def test_mot_files_read_back_with_motmetrics(tmp_path: Path) -> None:
    mm = pytest.importorskip("motmetrics")
    if not hasattr(np, "asfarray"):  # motmetrics 1.4.0 calls np.asfarray, which NumPy 2 removed
        np.asfarray = lambda a, dtype=float: np.asarray(a, dtype=dtype)  # type: ignore[attr-defined]
    _write(tmp_path)
    files = mot_names(NAMES)
    assert files == ["red_circle.txt", "blue_square.txt"]
    table = mm.io.loadtxt(str(tmp_path / MOT_FOLDER / files[0]), fmt="mot15-2D")
    assert table.index.tolist() == [(1, 1), (2, 1), (5, 1)]  # 1-based frames, track 1
    np.testing.assert_allclose(table.loc[(5, 1), ["X", "Y", "Width", "Height", "Confidence"]], [20, 10, 20, 20, 0.75])
    # the file scored against itself as ground truth: a perfect tracker
    acc = mm.utils.compare_to_groundtruth(table, table, "iou", distth=0.5)
    summary = mm.metrics.create().compute(acc, metrics=["idf1", "mota"])
    assert summary["idf1"].iloc[0] == 1.0 and summary["mota"].iloc[0] == 1.0


def test_mot_names_are_file_safe_and_distinct() -> None:
    assert mot_names(["a cat", "a/cat", "dog"]) == ["a_cat.txt", "a_cat-2.txt", "dog.txt"]
