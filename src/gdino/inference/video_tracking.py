"""Detection and tracking over a video's frames: ``track_video(detector, "clip.mp4", labels=[...])``.

Two pure stages, so a run can be journaled and replayed:

* ``detect_frames`` turns decoded frames into ``FrameDetections`` (what the detector found on every
  ``stride``-th frame, in batches through ``detector.detect`` with the prompt encoded once; the
  detector's prompt cache keeps BERT's output). Frames whose detections are already known (a
  journal) are not detected again. At most ``batch_size * stride`` frames wait in memory.
* ``track_detections`` gives the sequence to a ``Tracker``: a detected frame is a tracker step,
  a frame between steps (or one that could not be decoded) carries the tracks seen on the last step
  along their motion. Tracking depends on nothing but the ``FrameDetections`` sequence.

``FrameDetections.to_record`` / ``from_record`` are exact: Python floats written as JSON read back
as the same numbers, so a replay from the records tracks exactly as the run that wrote them.

With a segmenter, each detected frame's detections get their masks as they are detected, and the
records hold them as COCO RLE (lossless), so a replay needs no frame images. A tracked object has
a mask only on the frames where its box is a detection of that frame: on frames between strides
and where a track coasts at its predicted box, its mask is empty and its mask score NaN
(``"mask": null`` in ``TrackedFrame.to_record``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks, crop_mask
from gdino.inference.tracking import Assigned, Tracker, TrackerSettings
from gdino.processing.video import VideoFrame, open_video


@dataclass(frozen=True)
class FrameDetections:
    """What the detector found on one frame (nothing for a frame it did not run on).

    Attributes:
        index: 0-based frame index.
        time: presentation time in seconds.
        size: (width, height) of the frame; None for an undecodable one.
        boxes: (N, 4) float64 pixel x0, y0, x1, y1.
        scores: (N,) float64.
        label_ids: (N,) int64 indices into the prompt's phrases or the label list.
        detected: whether the detector ran on this frame (a tracker step).
        error: why the frame could not be decoded or detected; None when it could.
        masks: with a segmenter, the N detections' masks (None without one, and on frames not detected).
        mask_scores: (N,) float64 the segmenter's predicted IoU of each mask; None with ``masks``.
    """

    index: int
    time: float
    size: tuple[int, int] | None
    boxes: np.ndarray
    scores: np.ndarray
    label_ids: np.ndarray
    detected: bool
    error: str | None = None
    masks: Masks | None = None
    mask_scores: np.ndarray | None = None

    @classmethod
    def empty(cls, frame: VideoFrame, error: str | None = None) -> FrameDetections:
        """A frame the detector did not run on (between steps, or undecodable)."""
        size = None if frame.image is None else (frame.image.shape[1], frame.image.shape[0])
        return cls(frame.index, frame.time, size, np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), False, error)

    @classmethod
    def found(cls, frame: VideoFrame, detections: Detections) -> FrameDetections:
        """A detected frame, boxes clipped to it; float32 values widened exactly to float64."""
        width, height = detections.image_size
        boxes = np.asarray(detections.boxes, np.float64).reshape(-1, 4)  # (N, 4)
        boxes = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float64))
        scores = np.asarray(detections.scores, np.float64)
        labels = np.asarray(detections.label_ids, np.int64)
        found = detections.mask_scores
        mask_scores = None if found is None else np.asarray(found, np.float64)
        return cls(
            frame.index,
            frame.time,
            detections.image_size,
            boxes,
            scores,
            labels,
            True,
            None,
            detections.masks,
            mask_scores,
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict that ``from_record`` turns back into these very numbers."""
        return {
            "frame": self.index,
            "time": self.time,
            "size": None if self.size is None else list(self.size),
            "detected": self.detected,
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "label_ids": self.label_ids.tolist(),
            "error": self.error,
        } | self._mask_record()

    def _mask_record(self) -> dict[str, Any]:
        """``{"masks": [COCO RLE, ...], "mask_scores": [...]}`` with masks, else {} (records without
        a segmenter stay as they were)."""
        if self.masks is None or self.mask_scores is None:
            return {}
        return {"masks": self.masks.to_rle(), "mask_scores": self.mask_scores.tolist()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FrameDetections:
        size = record["size"]
        masks, mask_scores = None, None
        if record.get("masks") is not None:
            masks = masks_from_rle(record["masks"], (int(size[0]), int(size[1])))
            mask_scores = np.asarray(record["mask_scores"], np.float64)
        return cls(
            int(record["frame"]),
            float(record["time"]),
            None if size is None else (int(size[0]), int(size[1])),
            np.asarray(record["boxes"], np.float64).reshape(-1, 4),
            np.asarray(record["scores"], np.float64),
            np.asarray(record["label_ids"], np.int64),
            bool(record["detected"]),
            record.get("error"),
            masks,
            mask_scores,
        )


def masks_from_rle(rles: Sequence[dict[str, Any]], image_size: tuple[int, int]) -> Masks:
    """COCO RLE (``Masks.to_rle``'s) of a (width, height) image -> ``Masks``, exactly the masks encoded.

    Raises:
        ImportError: pycocotools is missing (``pip install 'gdino[masks]'``).
    """
    from pycocotools import mask as mask_utils

    crops = []
    for rle in rles:
        dense = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")})  # (H, W)
        crops.append(crop_mask(dense.astype(bool), (0, 0)))
    return Masks.from_crops(crops, image_size)


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's tracked objects.

    Attributes:
        index: 0-based frame index.
        time: presentation time in seconds.
        detections: the tracked boxes, with ``track_ids``, ascending by id; on a frame between
            detection steps the tracks' predicted boxes with their last scores. With a segmenter
            also ``masks`` and ``mask_scores`` aligned with the ids: an object's mask where its box
            is this frame's detection, an empty mask with mask score NaN where it is not (a
            frame between strides, a coasting track).
        detected: whether the detector ran on this frame.
        error: why the frame could not be decoded or detected; None when it could.
    """

    index: int
    time: float
    detections: Detections
    detected: bool
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON Lines record: frame, time, size, detected, error and the detections with track ids."""
        width, height = self.detections.image_size
        record: dict[str, Any] = {"frame": self.index, "time": round(self.time, 6), "width": width, "height": height}
        objects = self.detections.to_list()
        if self.detections.mask_scores is not None:
            for obj, mask_score in zip(objects, self.detections.mask_scores):
                if np.isnan(mask_score):  # not detected on this frame: no mask
                    obj["mask"], obj["mask_score"] = None, None
        record |= {"detected": self.detected, "detections": objects}
        if self.error is not None:
            record["error"] = self.error
        return record


Detect = Callable[[list[np.ndarray]], list[Detections]]


def detect_frames(
    frames: Iterable[VideoFrame],
    detect: Detect,
    stride: int = 1,
    batch_size: int = 4,
    known: Callable[[int], FrameDetections | None] = lambda index: None,
) -> Iterator[tuple[VideoFrame, FrameDetections]]:
    """Each frame with its detections, in order, detecting every ``stride``-th frame in batches.

    Args:
        frames: decoded frames (``VideoReader.frames``).
        detect: images -> their ``Detections`` (e.g. a bound ``detector.detect`` with the prompt).
        stride: detect on frames whose index is a multiple of this; the others are carried.
        batch_size: frames that go through ``detect`` together.
        known: the detections of a frame already done (a journal), or None to detect it.
    """
    waiting: list[tuple[VideoFrame, FrameDetections | None]] = []
    for frame in frames:
        done = known(frame.index)
        if done is None and frame.image is None:
            done = FrameDetections.empty(frame, frame.error)
        elif done is None and frame.index % stride:
            done = FrameDetections.empty(frame)
        waiting.append((frame, done))
        pending = sum(d is None for _, d in waiting)
        if pending == 0 or pending >= batch_size:
            yield from _flush(waiting, detect)
            waiting = []
    yield from _flush(waiting, detect)


def _flush(
    waiting: list[tuple[VideoFrame, FrameDetections | None]], detect: Detect
) -> Iterator[tuple[VideoFrame, FrameDetections]]:
    """Runs ``detect`` on the waiting frames that need it, then hands every waiting frame out in order."""
    todo = [frame for frame, done in waiting if done is None]
    found = dict(zip((f.index for f in todo), _detect_each(todo, detect)))
    for frame, done in waiting:
        yield frame, done if done is not None else found[frame.index]


def _detect_each(frames: list[VideoFrame], detect: Detect) -> list[FrameDetections]:
    """Detections of a batch; if the detector refuses it, frame by frame, a refused frame an error."""
    if not frames:
        return []
    try:
        results = detect([f.image for f in frames if f.image is not None])
    except ValueError as e:  # ImageError and the like: this frame cannot be used, the others can
        if len(frames) > 1:
            return [d for f in frames for d in _detect_each([f], detect)]
        return [FrameDetections.empty(frames[0], f"frame {frames[0].index} could not be detected on: {e}")]
    return [FrameDetections.found(f, d) for f, d in zip(frames, results)]


def track_detections(
    items: Iterable[tuple[Any, FrameDetections]],
    names: Sequence[str],
    settings: TrackerSettings | None = None,
    stride: int = 1,
    masks: bool = False,
) -> Iterator[tuple[Any, TrackedFrame]]:
    """Tracks a detection sequence: each item's first part (e.g. its frame) with its ``TrackedFrame``.

    Args:
        items: (anything, ``FrameDetections``) in frame order.
        names: the label of each label id (``detector.phrases``).
        settings: the tracker's thresholds and lost-track buffer.
        stride: frames per detection step.
        masks: give every frame's ``Detections`` masks (the detected frames' ``FrameDetections``
            carry them): each tracked box its detection's mask, or an empty one where it has none.
    """
    tracker = Tracker(settings or TrackerSettings(), stride)
    last_step: int | None = None
    size: tuple[int, int] = (0, 0)
    for extra, frame in items:
        size = frame.size or size
        if frame.detected:
            assigned = tracker.update(frame.boxes, frame.scores, frame.label_ids)
            last_step = frame.index
        else:
            fraction = 0.0 if last_step is None else (frame.index - last_step) / stride
            assigned = tracker.carried(fraction)
        found = _as_detections(assigned, names, size)
        if masks:
            found = found.with_masks(*_tracked_masks(assigned, frame, size))
        yield extra, TrackedFrame(frame.index, frame.time, found, frame.detected, frame.error)


def _as_detections(assigned: Assigned, names: Sequence[str], size: tuple[int, int]) -> Detections:
    return Detections(
        boxes=assigned.boxes.astype(np.float32),
        scores=assigned.scores.astype(np.float32),
        labels=tuple(names[int(i)] for i in assigned.label_ids),
        label_ids=assigned.label_ids,
        image_size=size,
        track_ids=assigned.track_ids,
    )


def _tracked_masks(assigned: Assigned, frame: FrameDetections, size: tuple[int, int]) -> tuple[Masks, np.ndarray]:
    """Each tracked box's mask and (K,) float32 mask score: its detection's on this frame, else an
    empty mask and NaN."""
    crops: list[tuple[np.ndarray, tuple[int, int]]] = []
    scores = np.full(len(assigned.detections), np.nan, np.float32)
    for k, d in enumerate(assigned.detections):
        if d < 0 or frame.masks is None or frame.mask_scores is None:
            crops.append((np.zeros((0, 0), bool), (0, 0)))
            continue
        x0, y0 = (int(v) for v in frame.masks.offsets[d])
        crops.append((frame.masks.crops[d], (x0, y0)))
        scores[k] = frame.mask_scores[d]
    return Masks.from_crops(crops, size), scores


def detector_call(
    detector: Any,
    prompt: Any = None,
    labels: Sequence[str] | None = None,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    nms_threshold: float | None = None,
    segmenter: Any = None,
) -> Detect:
    """``detector.detect`` bound to one prompt (or label list) and thresholds, for a list of frames;
    with a ``segmenter`` (``Segmenter`` or an ONNX export's), each frame's boxes also get masks."""

    def detect(images: list[np.ndarray]) -> list[Detections]:
        found = detector.detect(
            list(images),
            prompt,
            box_threshold,
            text_threshold,
            labels=labels,
            nms_threshold=nms_threshold,
        )
        if segmenter is None:
            return list(found)
        return [segmenter.add_masks(image, d) for image, d in zip(images, found)]

    return detect


def track_video(
    detector: Any,
    source: str,
    prompt: Any = None,
    *,
    labels: Sequence[str] | None = None,
    settings: TrackerSettings | None = None,
    stride: int = 1,
    batch_size: int = 4,
    nms_threshold: float | None = 0.5,
    segmenter: Any = None,
) -> Iterator[TrackedFrame]:
    """Detects and tracks objects through a video, a frame at a time (bounded memory).

    Args:
        detector: a ``GroundingDinoForObjectDetection`` (or anything with its ``detect`` and ``phrases``).
        source: a video file, a URL FFmpeg can open, or "-" for stdin.
        prompt: "a cat. a dog." (or give ``labels``).
        labels: a label list, e.g. ["cat", "dog"].
        settings: the tracker's; its ``low_threshold`` is the detector's box threshold.
        stride: detect every ``stride``-th frame and carry the tracks between.
        batch_size: frames per detector call.
        nms_threshold: per-label NMS of each frame's boxes (None for none).
        segmenter: a ``Segmenter`` (``load_segmenter``): the detected boxes also get masks, and
            each frame's ``Detections`` carry ``masks`` and ``mask_scores`` aligned with
            ``track_ids`` (empty and NaN where an object's box is not a detection of that frame).

    Yields:
        ``TrackedFrame`` per frame, as soon as its batch is detected.
    """
    settings = settings or TrackerSettings()
    names = detector.phrases(prompt, labels=labels)
    detect = detector_call(detector, prompt, labels, settings.low_threshold, None, nms_threshold, segmenter)
    with open_video(source) as video:
        found = detect_frames(video.frames(), detect, stride, batch_size)
        for _, tracked in track_detections(found, names, settings, stride, masks=segmenter is not None):
            yield tracked
