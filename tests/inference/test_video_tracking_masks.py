"""Masks through tracking (gdino.inference.video_tracking): journal records keep them exactly, each
tracked box gets its own detection's mask and none on carried frames, and the annotated video fills
them in the track's colour (gdino.apps.track_outputs.fill_masks)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
pytest.importorskip("scipy")

from gdino.apps.track_outputs import MASK_OPACITY, PALETTE, fill_masks
from gdino.inference.detections import Detections
from gdino.inference.masks import Masks
from gdino.inference.tracking import TrackerSettings
from gdino.inference.video_tracking import (
    FrameDetections,
    detector_call,
    masks_from_rle,
    track_detections,
    track_video,
)
from gdino.processing.video import VideoFrame

SIZE = (64, 48)  # (width, height)
NAMES = ["red circle", "blue square"]


def _square(x0: int, y0: int, side: int) -> np.ndarray:
    mask = np.zeros((SIZE[1], SIZE[0]), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def _boxes(boxes: list[list[int]], labels: list[int]) -> Detections:
    return Detections(
        boxes=np.array(boxes, np.float32).reshape(-1, 4),
        scores=np.full(len(boxes), 0.8, np.float32),
        labels=tuple(NAMES[i] for i in labels),
        label_ids=np.array(labels, np.int64),
        image_size=SIZE,
    )


def _detections(boxes: list[list[int]], masks: list[np.ndarray], labels: list[int]) -> Detections:
    scores = np.linspace(0.9, 0.6, len(boxes)).astype(np.float32)
    return _boxes(boxes, labels).with_masks(Masks.from_dense(np.stack(masks)), scores)


def _frame(index: int) -> VideoFrame:
    return VideoFrame(index, index / 10, np.zeros((SIZE[1], SIZE[0], 3), np.uint8))


def _moving(index: int) -> FrameDetections:
    """Two squares moving right 2 px a frame; the second also has a hole (RLE keeps holes)."""
    a, b = _square(2 + 2 * index, 4, 10), _square(30 + 2 * index, 20, 12)
    b[25, 35 + 2 * index] = False
    boxes = [[2 + 2 * index, 4, 12 + 2 * index, 14], [30 + 2 * index, 20, 42 + 2 * index, 32]]
    return FrameDetections.found(_frame(index), _detections(boxes, [a, b], [0, 1]))


def test_a_record_with_masks_reads_back_as_the_same_masks() -> None:
    frame = _moving(3)
    record = json.loads(json.dumps(frame.to_record()))
    assert [r["size"] for r in record["masks"]] == [[SIZE[1], SIZE[0]]] * 2
    back = FrameDetections.from_record(record)
    assert back.masks is not None and frame.masks is not None and back.mask_scores is not None
    np.testing.assert_array_equal(back.masks.dense(), frame.masks.dense())
    assert not back.masks.mask(1)[25, 41]  # the hole
    np.testing.assert_array_equal(back.mask_scores, frame.mask_scores)  # float32 widened, exactly
    assert json.dumps(back.to_record()) == json.dumps(frame.to_record())


def test_a_record_without_masks_has_no_mask_keys() -> None:
    plain = FrameDetections.empty(_frame(0))
    assert "masks" not in plain.to_record() and FrameDetections.from_record(plain.to_record()).masks is None


def test_masks_from_rle_of_an_empty_mask() -> None:
    empty = Masks.from_dense(np.zeros((1, SIZE[1], SIZE[0]), bool))
    back = masks_from_rle(empty.to_rle(), SIZE)
    assert back.crops[0].shape == (0, 0) and back.areas().tolist() == [0]


def test_each_track_gets_its_own_detections_mask_and_none_between_strides() -> None:
    frames = [_moving(i) if i % 2 == 0 else FrameDetections.empty(_frame(i)) for i in range(5)]
    two = frames[2]  # the detector gave the two in the other order on frame 2
    assert two.masks is not None and two.mask_scores is not None
    frames[2] = replace(
        two,
        boxes=two.boxes[::-1].copy(),
        scores=two.scores[::-1].copy(),
        label_ids=two.label_ids[::-1].copy(),
        masks=two.masks.select([1, 0]),
        mask_scores=two.mask_scores[::-1].copy(),
    )
    settings = TrackerSettings(0.5, 0.1, 0.2)
    tracked = [t for _, t in track_detections(((None, f) for f in frames), NAMES, settings, stride=2, masks=True)]
    for t in tracked:
        found = t.detections
        assert found.masks is not None and found.mask_scores is not None and found.track_ids is not None
        assert found.track_ids.tolist() == [1, 2] and found.labels == ("red circle", "blue square")
        if t.detected:
            index = t.index
            np.testing.assert_array_equal(found.masks.mask(0), _square(2 + 2 * index, 4, 10))
            assert found.masks.areas()[1] == 12 * 12 - 1
            assert found.mask_scores.tolist() == pytest.approx([0.9, 0.6])
            assert all(d["mask"]["size"] == [SIZE[1], SIZE[0]] for d in t.to_record()["detections"])
        else:  # carried: the boxes move on, the masks are not guessed
            assert np.isnan(found.mask_scores).all() and found.masks.areas().tolist() == [0, 0]
            assert [(d["mask"], d["mask_score"]) for d in t.to_record()["detections"]] == [(None, None)] * 2


def test_without_masks_the_detections_have_none() -> None:
    tracked = list(track_detections([(None, _moving(0))], NAMES, TrackerSettings(0.5, 0.1, 0.2)))
    assert tracked[0][1].detections.masks is None
    assert "mask" not in tracked[0][1].to_record()["detections"][0]


def test_detector_call_adds_the_segmenters_masks() -> None:
    class Detector:
        def detect(self, images: list[np.ndarray], *args: object, **kwargs: object) -> list[Detections]:
            return [_boxes([[2, 4, 12, 14]], [0]) for _ in images]

    class Segmenter:
        def __init__(self) -> None:
            self.seen: list[tuple[int, ...]] = []

        def add_masks(self, image: np.ndarray, found: Detections) -> Detections:
            self.seen.append(image.shape[:2])
            return found.with_masks(Masks.from_dense(_square(3, 5, 4)[None]), np.array([0.5], np.float32))

    segmenter = Segmenter()
    images = [np.zeros((SIZE[1], SIZE[0], 3), np.uint8)] * 2
    found = detector_call(Detector(), labels=NAMES, segmenter=segmenter)(images)
    assert segmenter.seen == [(SIZE[1], SIZE[0])] * 2
    assert all(f.masks is not None and f.masks.areas().tolist() == [16] for f in found)


def test_fill_masks_blends_the_track_colour_inside_the_mask_only() -> None:
    tracked = list(track_detections([(None, _moving(0))], NAMES, TrackerSettings(0.5, 0.1, 0.2), masks=True))
    frame = tracked[0][1]
    image = np.full((SIZE[1], SIZE[0], 3), 100, np.uint8)
    filled = fill_masks(image, frame)
    assert (image == 100).all()  # the frame given is left as it was
    inside, outside = filled[8, 6], filled[40, 5]
    assert outside.tolist() == [100, 100, 100]
    colour = np.array(PALETTE[1 % len(PALETTE)])  # track 1's
    assert inside.tolist() == np.round((1 - MASK_OPACITY) * 100 + MASK_OPACITY * colour).astype(int).tolist()
    assert inside.tolist() != [100, 100, 100]
    assert filled[25, 35].tolist() == [100, 100, 100]  # the hole in the second square's mask


def test_track_video_with_a_segmenter_gives_masks_aligned_with_the_ids(tmp_path: Path) -> None:
    pytest.importorskip("av")
    from gdino.training.shapes_video import VideoSettings, write_shapes_video

    video = tmp_path / "clip.mp4"
    write_shapes_video(video, 5, VideoSettings(size=SIZE, frames=4))

    class Detector:
        def phrases(self, prompt: object = None, *, labels: list[str]) -> list[str]:
            return list(labels)

        def detect(self, images: list[np.ndarray], *args: object, **kwargs: object) -> list[Detections]:
            return [_boxes([[30, 20, 42, 32], [2, 4, 12, 14]], [1, 0]) for _ in images]

    class Segmenter:
        def add_masks(self, image: np.ndarray, found: Detections) -> Detections:
            masks = Masks.from_dense(np.stack([_square(30, 20, 12), _square(2, 4, 10)]))
            return found.with_masks(masks, np.array([0.7, 0.9], np.float32))

    settings = TrackerSettings(0.5, 0.1, 0.2)
    frames = list(track_video(Detector(), str(video), labels=NAMES, settings=settings, stride=2, segmenter=Segmenter()))
    assert [f.detected for f in frames] == [True, False, True, False]
    for f in frames:
        found = f.detections
        assert found.track_ids is not None and found.masks is not None and found.mask_scores is not None
        assert found.track_ids.tolist() == [1, 2] and found.labels == ("blue square", "red circle")
        if f.detected:  # ordered by id, each with its own detection's mask
            assert found.mask_scores.tolist() == pytest.approx([0.7, 0.9])
            assert found.masks.areas().tolist() == [144, 100]
        else:
            assert np.isnan(found.mask_scores).all()
