"""The moving-shapes videos (gdino.training.shapes_video): deterministic, objects moving, entering and
leaving, ground truth of what is in view, and a MOTChallenge gt file of it."""

from __future__ import annotations

import numpy as np

from gdino.training.shapes import pair_names
from gdino.training.shapes_video import VideoSettings, shapes_video, truth_mot, video_pairs

SMALL = VideoSettings(size=(160, 128), frames=30, objects=(4, 4))


def test_a_video_depends_only_on_its_seed() -> None:
    first = [(image.copy(), truth) for image, truth in shapes_video(3, SMALL)]
    again = list(shapes_video(3, SMALL))
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))
    other = next(iter(shapes_video(4, SMALL)))[0]
    assert not np.array_equal(first[0][0], other)


def test_ground_truth_moves_and_names_the_pairs_of_the_video() -> None:
    frames = list(shapes_video(5, SMALL))
    assert len(frames) == 30 and frames[0][0].shape == (128, 160, 3)
    ids = {b.track_id for _, truth in frames for b in truth}
    assert len(ids) >= 2
    names = pair_names()
    assert {names[b.pair] for _, truth in frames for b in truth} <= set(video_pairs(5, SMALL))
    track = min(ids)
    boxes = [b.box for _, truth in frames for b in truth if b.track_id == track]
    assert len(boxes) >= 2 and boxes[0] != boxes[-1]  # it moves
    for _, truth in frames:
        for b in truth:
            x0, y0, x1, y1 = b.box
            assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 128


def test_objects_enter_and_leave_across_videos() -> None:
    entering = leaving = 0
    for seed in range(6):
        seen = [{b.track_id for b in truth} for _, truth in shapes_video(seed, SMALL)]
        ids = set().union(*seen)
        entering += sum(1 for i in ids if i not in seen[0])
        leaving += sum(1 for i in ids if i not in seen[-1])
    assert entering > 0 and leaving > 0


def test_truth_as_mot_lines() -> None:
    truth = [truth for _, truth in shapes_video(2, SMALL)]
    lines = truth_mot(truth).splitlines()
    assert len(lines) == sum(len(t) for t in truth)
    frame, track, x, _, w, _, *rest = lines[0].split(",")
    first = truth[int(frame) - 1][0]
    assert int(track) == first.track_id and float(x) == round(first.box[0] + 1, 2)
    assert float(w) == round(first.box[2] - first.box[0], 2)
    assert rest == ["1", "1", "1"]
