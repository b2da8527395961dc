"""What ``gdino track`` writes in its ``OUT``: JSON Lines, MOTChallenge, CVAT for video 1.1, an annotated video.

* ``tracks.jsonl``: one record per frame, ``{"frame", "time", "width", "height", "detected",
  "detections": [{"box", "score", "label", "label_id", "track_id"}]}`` (and ``"error"`` for a
  frame that could not be decoded), written as frames come; with ``--masks`` each object also has
  ``"mask"`` (COCO RLE ``{"size": [h, w], "counts"}``) and ``"mask_score"``, both null on frames
  where its box is not a detection of the frame (between strides, coasting).
* ``mot/<label>.txt``: one MOTChallenge file per label, ``frame,id,x,y,w,h,conf,-1,-1,-1`` with
  1-based frames and pixel coordinates, as trackers' results are submitted; written as frames come.
* ``annotations.xml``: CVAT for video 1.1 (``<track>`` per object with a ``<box>`` per frame;
  ``keyframe="1"`` where the detector saw it, ``outside="1"`` on the frame after it was last seen
  and before it reappears), written at the end from ``tracks.jsonl``.
* ``annotated.mp4`` (``--annotate``): each frame with its boxes, "label #id", a trail of each
  track's last centres and, with masks, each mask filled translucent in its track's colour,
  encoded as it comes.

Every file is written fresh by each run (a resumed run replays the journal), so a run's outputs
do not depend on whether it was interrupted.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gdino.inference.video_tracking import TrackedFrame

JSONL = "tracks.jsonl"
MOT_FOLDER = "mot"
CVAT = "annotations.xml"
ANNOTATED = "annotated.mp4"
TRAIL = 20  # centres kept per track for the drawn trail
MASK_OPACITY = 0.45  # of a mask's fill in the annotated video
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def mot_names(names: Sequence[str]) -> list[str]:
    """A file name per label: its letters and digits, ``_`` for the rest, ``-2``... where two clash."""
    taken: set[str] = set()
    files = []
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "label"
        candidate, n = stem, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate.lower())
        files.append(f"{candidate}.txt")
    return files


def mot_line(frame: int, track_id: int, box: np.ndarray, score: float) -> str:
    """One MOTChallenge result line; ``frame`` and the box are 0-based here and written 1-based, as
    MOTChallenge counts frames and pixels (its readers, e.g. motmetrics, subtract the 1 again)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return f"{frame + 1},{track_id},{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f},{score:.4f},-1,-1,-1\n"


class StreamedOutputs:
    """``tracks.jsonl`` and the MOT files of ``out``, written (and flushed) a frame at a time."""

    def __init__(self, out: Path, names: Sequence[str]) -> None:
        (out / MOT_FOLDER).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(out / JSONL, "w")  # noqa: SIM115 (open for the run, closed by close())
        self._mot: list[IO[str]] = [open(out / MOT_FOLDER / f, "w") for f in mot_names(names)]  # noqa: SIM115 (as above)

    def write(self, frame: TrackedFrame) -> None:
        self._jsonl.write(json.dumps(frame.to_record()) + "\n")
        found = frame.detections
        assert found.track_ids is not None
        for box, score, label_id, track_id in zip(found.boxes, found.scores, found.label_ids, found.track_ids):
            self._mot[int(label_id)].write(mot_line(frame.index, int(track_id), box, float(score)))
        self._jsonl.flush()
        for f in self._mot:
            f.flush()

    def close(self) -> None:
        self._jsonl.close()
        for f in self._mot:
            f.close()


def cvat_xml(jsonl: Path, names: Sequence[str], name: str) -> str:
    """CVAT for video 1.1 from ``tracks.jsonl``: a ``<track>`` per track id, its boxes frame by frame."""
    boxes: dict[int, list[tuple[int, dict[str, Any], bool]]] = defaultdict(list)
    labels: dict[int, str] = {}
    frames, width, height = 0, 0, 0
    with open(jsonl) as f:
        for line in f:
            record = json.loads(line)
            frames = record["frame"] + 1
            width, height = max(width, record["width"]), max(height, record["height"])
            for d in record["detections"]:
                boxes[d["track_id"]].append((record["frame"], d, record["detected"]))
                labels[d["track_id"]] = d["label"]
    head = _cvat_meta(names, name, frames, width, height)
    tracks = [_cvat_track(n, labels[track_id], boxes[track_id], frames) for n, track_id in enumerate(sorted(boxes))]
    return head + "".join(tracks) + "</annotations>\n"


def _cvat_meta(names: Sequence[str], name: str, frames: int, width: int, height: int) -> str:
    label = "        <label>\n          <name>{}</name>\n          <attributes>\n          </attributes>\n"
    label += "        </label>\n"
    labels = "".join(label.format(_text(n)) for n in names)
    task = [
        f"      <name>{_text(name)}</name>",
        f"      <size>{frames}</size>",
        "      <mode>interpolation</mode>",
        "      <overlap>0</overlap>",
        "      <start_frame>0</start_frame>",
        f"      <stop_frame>{max(0, frames - 1)}</stop_frame>",
        f"      <labels>\n{labels}      </labels>",
        f"      <original_size>\n        <width>{width}</width>\n        <height>{height}</height>",
        "      </original_size>",
    ]
    head = '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n  <meta>\n    <task>\n'
    return head + "\n".join(task) + "\n    </task>\n  </meta>\n"


def _cvat_track(n: int, label: str, seen: list[tuple[int, dict[str, Any], bool]], frames: int) -> str:
    """``<track id=n>``: a box per frame it was seen on, and an ``outside`` box after each stretch
    (CVAT numbers tracks 0, 1, ... in the file; our track ids are in ``tracks.jsonl`` and the MOT files)."""
    lines = [f'  <track id="{n}" label={quoteattr(label)} source="auto">\n']
    for k, (frame, d, detected) in enumerate(seen):
        lines.append(_cvat_box(frame, d["box"], outside=False, keyframe=detected or k == 0))
        next_frame = seen[k + 1][0] if k + 1 < len(seen) else None
        if next_frame != frame + 1 and frame + 1 < frames:  # gone from the next frame on
            lines.append(_cvat_box(frame + 1, d["box"], outside=True, keyframe=True))
    lines.append("  </track>\n")
    return "".join(lines)


def _cvat_box(frame: int, box: Sequence[float], outside: bool, keyframe: bool) -> str:
    x0, y0, x1, y1 = box
    return (
        f'    <box frame="{frame}" outside="{int(outside)}" occluded="0" keyframe="{int(keyframe)}" '
        f'xtl="{x0:.2f}" ytl="{y0:.2f}" xbr="{x1:.2f}" ybr="{y1:.2f}" z_order="0">\n    </box>\n'
    )


def _text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Annotator:
    """Draws tracked frames: each box in its track's colour, "label #id" and the track's trail."""

    def __init__(self) -> None:
        self._trails: dict[int, deque[tuple[float, float]]] = {}

    def draw(self, image: np.ndarray, frame: TrackedFrame) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the same with this frame's tracks drawn."""
        picture = Image.fromarray(fill_masks(image, frame))
        draw = ImageDraw.Draw(picture)
        size = max(10, round(min(picture.size) / 28))
        font = ImageFont.load_default(size=size)
        found = frame.detections
        assert found.track_ids is not None
        for box, label, track_id in zip(found.boxes, found.labels, found.track_ids):
            colour = PALETTE[int(track_id) % len(PALETTE)]
            x0, y0, x1, y1 = (float(v) for v in box)
            trail = self._trails.setdefault(int(track_id), deque(maxlen=TRAIL))
            trail.append(((x0 + x1) / 2, (y0 + y1) / 2))
            if len(trail) > 1:
                draw.line(list(trail), fill=colour, width=2)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
            draw.text((x0 + 2, max(0.0, y0 - size - 2)), f"{label} #{track_id}", fill=colour, font=font)
        return np.asarray(picture)


def fill_masks(image: np.ndarray, frame: TrackedFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB with each tracked object's mask (where it has one) blended in at
    ``MASK_OPACITY`` in its track's colour; ``image`` itself when the frame has no masks."""
    found = frame.detections
    if found.masks is None or found.mask_scores is None or found.track_ids is None:
        return image
    filled = image.copy()
    for crop, (x0, y0), mask_score, track_id in zip(
        found.masks.crops, found.masks.offsets, found.mask_scores, found.track_ids
    ):
        if np.isnan(mask_score) or crop.size == 0:
            continue
        region = filled[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]  # (h, w, 3) view of the crop's box
        colour = np.array(PALETTE[int(track_id) % len(PALETTE)], np.float32)
        region[crop] = np.round((1 - MASK_OPACITY) * region[crop] + MASK_OPACITY * colour).astype(np.uint8)
    return filled
