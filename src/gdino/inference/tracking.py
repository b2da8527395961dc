"""ByteTrack: ids for detections across frames, by two-stage IoU association on a Kalman motion model.

Our own small implementation (numpy and scipy's ``linear_sum_assignment``), following the ByteTrack
paper (Zhang et al., 2022) and roboflow/trackers' ``ByteTrackTracker``: each step, the tracks'
boxes are predicted a step ahead; detections scoring at least ``track_threshold`` are matched to
the tracks first (also to lost ones, which so get their id back), then the lower-scoring ones
(down to ``low_threshold``) to the tracks still unmatched, which recovers objects whose score
dips while they are partly hidden. Tracks still unmatched are lost, and forgotten after
``lost_frames``; a strong detection left over starts a track, which gets its id once it is matched
again on the next step (on the very first step at once). A track keeps one label: detections are
matched only to tracks of their own label, so ids never pass from one class to another. Ids are
1, 2, ... in order of confirmation, unique across labels.

The tracker is a pure function of the detection sequence it is given (no clock, no randomness),
so replaying the same detections gives the same ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from gdino.inference import kalman
from gdino.inference.kalman import BoxState


@dataclass(frozen=True)
class TrackerSettings:
    """How detections become tracks.

    Attributes:
        track_threshold: detections scoring this or more are matched first and may start tracks.
        low_threshold: detections from this up to ``track_threshold`` only continue tracks.
        match_iou: the least IoU between a predicted track box and a detection for a match.
        low_match_iou: the same for the second, low-score association (ByteTrack: 0.5).
        lost_frames: how many frames a track that is not seen keeps its id.
        new_track_threshold: the least score that starts a track (default: ``track_threshold``;
            ByteTrack's is 0.1 above it).
        coast_frames: for this many frames after a track is lost, it is still given, at its
            predicted box with its last score (bridges a detector's short gaps; 0: only tracks seen).
    """

    track_threshold: float = 0.5
    low_threshold: float = 0.1
    match_iou: float = 0.2
    low_match_iou: float = 0.5
    lost_frames: int = 30
    new_track_threshold: float | None = None
    coast_frames: int = 0

    def __post_init__(self) -> None:
        for name in ("track_threshold", "low_threshold", "match_iou", "low_match_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.low_threshold > self.track_threshold:
            raise ValueError(f"low_threshold {self.low_threshold} is above track_threshold {self.track_threshold}")
        if self.lost_frames < 0 or self.coast_frames < 0:
            raise ValueError(
                f"lost_frames and coast_frames must be 0 or more, got {self.lost_frames}, {self.coast_frames}"
            )

    @property
    def start_threshold(self) -> float:
        chosen = self.new_track_threshold
        return self.track_threshold if chosen is None else chosen


@dataclass
class _Track:
    label_id: int
    state: BoxState
    score: float
    last_step: int
    id: int = 0  # 0 until confirmed
    lost: bool = False
    matched: bool = True  # matched on the latest step
    detection: int = -1  # the detection it was matched to on the latest step


@dataclass(frozen=True)
class Assigned:
    """What one step gives: for each confirmed track seen in it, its detection and id.

    Attributes:
        detections: (K,) int64 indices of the detections given to ``update`` (-1 for ``carried``).
        track_ids: (K,) int64 ids, ascending.
        boxes: (K, 4) float64 boxes, the detections' own (``carried``: the tracks' predicted ones).
        scores: (K,) float64 the detections' scores (``carried``: each track's last).
        label_ids: (K,) int64.
    """

    detections: np.ndarray
    track_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    label_ids: np.ndarray


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) and (M, 4) x0, y0, x1, y1 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)  # (N, M)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _match(
    tracks: list[_Track], boxes: np.ndarray, labels: np.ndarray, candidates: np.ndarray, least_iou: float
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Optimal IoU matching of ``tracks`` to the detections ``candidates`` (indices), same label only.

    Returns (track index, detection index) pairs, unmatched track indices, unmatched detection indices.
    """
    if not tracks or len(candidates) == 0:
        return [], list(range(len(tracks))), [int(c) for c in candidates]
    from scipy.optimize import linear_sum_assignment

    predicted = np.stack([t.state.box() for t in tracks])  # (T, 4)
    iou = box_iou(predicted, boxes[candidates])  # (T, C)
    same = np.array([t.label_id for t in tracks])[:, None] == labels[candidates][None, :]
    iou = np.where(same, iou, 0.0)
    rows, cols = linear_sum_assignment(1.0 - iou)
    pairs = [(int(r), int(candidates[c])) for r, c in zip(rows, cols) if iou[r, c] >= least_iou and iou[r, c] > 0]
    used_t = {r for r, _ in pairs}
    used_d = {d for _, d in pairs}
    return pairs, [i for i in range(len(tracks)) if i not in used_t], [int(c) for c in candidates if c not in used_d]


@dataclass
class Tracker:
    """ByteTrack over detection steps (``update``), with boxes carried between them (``carried``).

    Args:
        settings: thresholds and the lost-track buffer.
        stride: frames per detection step (``--stride``): ``lost_frames`` is counted in frames.
    """

    settings: TrackerSettings = field(default_factory=TrackerSettings)
    stride: int = 1
    _tracks: list[_Track] = field(default_factory=list)
    _step: int = 0
    _next_id: int = 1

    def update(self, boxes: np.ndarray, scores: np.ndarray, label_ids: np.ndarray) -> Assigned:
        """One detection step: (N, 4) pixel boxes, (N,) scores and (N,) label ids -> the tracks seen."""
        s = self.settings
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        scores = np.asarray(scores, np.float64).reshape(-1)
        labels = np.asarray(label_ids, np.int64).reshape(-1)
        for track in self._tracks:
            track.state = kalman.predict(track.state)
            track.matched = False
        high = np.flatnonzero(scores >= s.track_threshold)
        low = np.flatnonzero((scores >= s.low_threshold) & (scores < s.track_threshold))
        confirmed = [t for t in self._tracks if t.id]
        pairs, left, high_left = _match(confirmed, boxes, labels, high, s.match_iou)
        self._apply(confirmed, pairs, boxes, scores)
        active = [confirmed[i] for i in left if not confirmed[i].lost]
        pairs, left_active, _ = _match(active, boxes, labels, low, s.low_match_iou)
        self._apply(active, pairs, boxes, scores)
        for i in left_active:
            active[i].lost = True
        pending = [t for t in self._tracks if not t.id]
        pairs, _, fresh = _match(pending, boxes, labels, np.asarray(high_left, np.int64), s.match_iou)
        self._apply(pending, pairs, boxes, scores)
        for track in pending:
            if track.matched:
                track.id, self._next_id = self._next_id, self._next_id + 1
        self._forget(pending)
        self._start(fresh, boxes, scores, labels)
        self._step += 1
        return self._seen(boxes, scores)

    def carried(self, fraction: float) -> Assigned:
        """The tracks seen on the last step, moved ``fraction`` of a step along their velocity
        (frames between detection steps)."""
        seen = sorted((t for t in self._tracks if t.id and t.matched), key=lambda t: t.id)
        return Assigned(
            np.full(len(seen), -1, np.int64),
            np.array([t.id for t in seen], np.int64),
            np.array([t.state.box_ahead(fraction) for t in seen], np.float64).reshape(-1, 4),
            np.array([t.score for t in seen], np.float64),
            np.array([t.label_id for t in seen], np.int64),
        )

    def _apply(self, tracks: list[_Track], pairs: list[tuple[int, int]], boxes: np.ndarray, scores: np.ndarray) -> None:
        for t, d in pairs:
            track = tracks[t]
            track.state = kalman.correct(track.state, boxes[d])
            track.score, track.last_step, track.lost, track.matched = float(scores[d]), self._step, False, True
            track.detection = d

    def _forget(self, pending: list[_Track]) -> None:
        """Drops unconfirmed tracks not matched now, and lost tracks past the buffer."""
        buffer = math.ceil(self.settings.lost_frames / self.stride)
        drop = {id(t) for t in pending if not t.matched}
        drop |= {id(t) for t in self._tracks if t.lost and self._step - t.last_step > buffer}
        self._tracks = [t for t in self._tracks if id(t) not in drop]

    def _start(self, fresh: list[int], boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """New tracks from strong detections left over; confirmed at once on the first step."""
        for d in fresh:
            if scores[d] < self.settings.start_threshold:
                continue
            track = _Track(int(labels[d]), kalman.start(boxes[d]), float(scores[d]), self._step)
            track.detection = d
            if self._step == 0:
                track.id, self._next_id = self._next_id, self._next_id + 1
            self._tracks.append(track)

    def _seen(self, boxes: np.ndarray, scores: np.ndarray) -> Assigned:
        """The confirmed tracks matched now (their detections) and those coasting (their predictions)."""
        coast = math.ceil(self.settings.coast_frames / self.stride)
        seen = sorted(
            (t for t in self._tracks if t.id and (t.matched or (t.lost and self._step - 1 - t.last_step <= coast))),
            key=lambda t: t.id,
        )
        index = np.array([t.detection if t.matched else -1 for t in seen], np.int64)
        given = np.array([boxes[t.detection] if t.matched else t.state.box() for t in seen]).reshape(-1, 4)
        return Assigned(
            index,
            np.array([t.id for t in seen], np.int64),
            given,
            np.array([scores[t.detection] if t.matched else t.score for t in seen], np.float64),
            np.array([t.label_id for t in seen], np.int64),
        )
