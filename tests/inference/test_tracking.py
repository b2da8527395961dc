"""ByteTrack (gdino.inference.tracking): ids kept through motion, dips in score, absences within the
lost-track buffer, and never passed between labels; a pure function of the detections."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from gdino.inference.tracking import Tracker, TrackerSettings, box_iou


def _box(cx: float, cy: float, r: float = 10.0) -> list[float]:
    return [cx - r, cy - r, cx + r, cy + r]


def _run(tracker: Tracker, steps: list[list[tuple[list[float], float, int]]]) -> list[dict[int, int]]:
    """Per step: {detection index: track id} of the tracks seen."""
    out = []
    for dets in steps:
        boxes = np.array([d[0] for d in dets]).reshape(-1, 4)
        scores = np.array([d[1] for d in dets])
        labels = np.array([d[2] for d in dets], np.int64)
        seen = tracker.update(boxes, scores, labels)
        out.append(dict(zip(seen.detections.tolist(), seen.track_ids.tolist())))
    return out


def test_box_iou() -> None:
    iou = box_iou(
        np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    )
    np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]])


def test_two_moving_objects_keep_their_ids() -> None:
    steps = [[(_box(20 + 4 * t, 50), 0.9, 0), (_box(200 - 4 * t, 50), 0.8, 0)] for t in range(20)]
    ids = _run(Tracker(), steps)
    assert ids[0] == {0: 1, 1: 2}
    assert all(step == {0: 1, 1: 2} for step in ids)


def test_low_scores_continue_a_track_but_do_not_start_one() -> None:
    settings = TrackerSettings(track_threshold=0.5, low_threshold=0.1)
    steps = [[(_box(50 + 3 * t, 50), 0.9 if t < 3 or t > 6 else 0.2, 0)] for t in range(10)]
    steps[0].append((_box(200, 200), 0.3, 0))  # weak from the start: never a track
    ids = _run(Tracker(settings), steps)
    assert [step.get(0) for step in ids] == [1] * 10
    assert 1 not in ids[0]


def test_a_returning_object_keeps_its_id_within_the_buffer_only() -> None:
    def run(gap: int, lost_frames: int) -> list[dict[int, int]]:
        steps = [[(_box(50 + 2 * t, 50), 0.9, 0)] for t in range(5)]
        steps += [[] for _ in range(gap)]
        steps += [[(_box(50 + 2 * (5 + gap + t), 50), 0.9, 0)] for t in range(3)]
        return _run(Tracker(TrackerSettings(lost_frames=lost_frames)), steps)

    kept = run(gap=5, lost_frames=10)
    assert kept[-1] == {0: 1}
    forgotten = run(gap=12, lost_frames=10)
    assert forgotten[-3] == {}  # a new track waits one step for its id
    assert forgotten[-1] == {0: 2}


def test_an_object_entering_later_gets_a_new_id_after_a_second_sighting() -> None:
    steps = [[(_box(30, 30), 0.9, 0)] for _ in range(3)]
    steps += [[(_box(30, 30), 0.9, 0), (_box(150, 150), 0.9, 0)] for _ in range(3)]
    ids = _run(Tracker(), steps)
    assert ids[3] == {0: 1}
    assert ids[4] == {0: 1, 1: 2}


def test_ids_never_pass_between_labels() -> None:
    # a label-0 object stops where a label-1 object appears: the new one gets its own id
    steps = [[(_box(50, 50), 0.9, 0)] for _ in range(3)] + [[(_box(50, 50), 0.9, 1)] for _ in range(3)]
    ids = _run(Tracker(), steps)
    assert ids[2] == {0: 1}
    assert ids[4] == {0: 2}
    # two labels crossing each other keep their ids
    cross = [[(_box(20 + 10 * t, 50), 0.9, 0), (_box(220 - 10 * t, 52), 0.9, 1)] for t in range(21)]
    ids = _run(Tracker(), cross)
    assert all(step == {0: 1, 1: 2} for step in ids)


def test_carried_boxes_move_along_the_velocity() -> None:
    tracker = Tracker()
    for t in range(6):
        tracker.update(np.array([_box(50 + 10 * t, 50)]), np.array([0.9]), np.array([0]))
    half = tracker.carried(0.5)
    assert half.track_ids.tolist() == [1]
    centre = (half.boxes[0, 0] + half.boxes[0, 2]) / 2
    assert 100 < centre < 110  # the last box is centred at 100, moving 10 a step


def test_the_same_detections_give_the_same_tracks() -> None:
    rng = np.random.default_rng(0)
    steps = [
        [(_box(*rng.uniform(20, 200, 2)), float(rng.uniform(0.1, 1)), int(rng.integers(2))) for _ in range(5)]
        for _ in range(15)
    ]
    assert _run(Tracker(), steps) == _run(Tracker(), steps)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="low_threshold"):
        TrackerSettings(track_threshold=0.2, low_threshold=0.3)
    with pytest.raises(ValueError, match="match_iou"):
        TrackerSettings(match_iou=1.5)


def test_a_lost_track_coasts_at_its_prediction_for_coast_frames() -> None:
    steps = [[(_box(50 + 5 * t, 50), 0.9, 0)] for t in range(5)] + [[] for _ in range(4)]
    tracker = Tracker(TrackerSettings(coast_frames=2))
    seen = []
    for dets in steps:
        boxes = np.array([d[0] for d in dets]).reshape(-1, 4)
        seen.append(tracker.update(boxes, np.array([d[1] for d in dets]), np.array([d[2] for d in dets], np.int64)))
    assert [s.track_ids.tolist() for s in seen[4:]] == [[1], [1], [1], [], []]
    assert seen[5].detections.tolist() == [-1] and seen[5].scores.tolist() == [0.9]
    centre = (seen[6].boxes[0, 0] + seen[6].boxes[0, 2]) / 2
    assert 75 < centre < 85  # still moving on: last seen at 70, 5 a step
