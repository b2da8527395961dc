"""Synthetic videos of moving coloured shapes, with their ground-truth tracks (``gdino track``'s proof).

Each object is a colour-shape pair of ``gdino.training.shapes`` moving from one point to another
over its lifetime, on a straight or a curved (arched) path, at its own speed. Points may lie
outside the frame, so objects enter and leave; paths cross, and the object drawn later hides the
one beneath; some objects have a twin of the same colour and shape moving beside them. The
background is fixed for a video (flat, gradient or noise), with fresh grain on every frame.

The ground truth of a frame holds every object of which at least ``min_visible`` of its area is
in view (neither outside the frame nor hidden), its box the tight bounds of its visible pixels.
A video depends only on its seed and settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gdino.processing.video_writer import VideoWriter
from gdino.training.shapes import COLOURS, background, outline, pair_names


@dataclass(frozen=True)
class VideoSettings:
    """What a generated video looks like.

    Attributes:
        size: (width, height) in pixels.
        frames: how many frames.
        fps: frames per second.
        objects: (fewest, most) objects, twins included.
        radius: (smallest, largest) radius, a fraction of the shorter side.
        twins: the chance that an object has a twin of its pair moving beside it.
        curved: the chance that a path arches.
        min_visible: the least share of an object's area in view for it to be in the ground truth.
        grain: standard deviation of each frame's noise.
    """

    size: tuple[int, int] = (320, 256)
    frames: int = 60
    fps: float = 10.0
    objects: tuple[int, int] = (3, 5)
    radius: tuple[float, float] = (0.08, 0.13)
    twins: float = 0.3
    curved: float = 0.5
    min_visible: float = 0.7
    grain: float = 3.0


@dataclass(frozen=True)
class Mover:
    """One object's path: from ``start`` at frame ``first`` to ``end`` at frame ``last``, bowed by ``bend``."""

    track_id: int
    pair: int
    radius: float
    angle: float
    start: tuple[float, float]
    end: tuple[float, float]
    first: int
    last: int
    bend: float
    colour: tuple[int, int, int]

    def centre(self, frame: int) -> tuple[float, float] | None:
        """Where the object is at ``frame``; None outside its lifetime."""
        if not self.first <= frame <= self.last:
            return None
        s = (frame - self.first) / max(1, self.last - self.first)
        (x0, y0), (x1, y1) = self.start, self.end
        dx, dy = x1 - x0, y1 - y0
        length = math.hypot(dx, dy) or 1.0
        lift = self.bend * math.sin(math.pi * s)  # perpendicular offset of an arched path
        return x0 + s * dx - lift * dy / length, y0 + s * dy + lift * dx / length


@dataclass(frozen=True)
class TruthBox:
    """One object in one frame: its track, pair index (into ``pair_names``) and visible box (x0, y0, x1, y1)."""

    track_id: int
    pair: int
    box: tuple[float, float, float, float]


def _point(rng: np.random.Generator, width: int, height: int, radius: float, outside: bool) -> tuple[float, float]:
    """A point inside the frame (``radius`` from its edges), or just outside one of its four edges."""
    x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    if not outside:
        return x, y
    edge = int(rng.integers(4))
    return [(-1.2 * radius, y), (width + 1.2 * radius, y), (x, -1.2 * radius), (x, height + 1.2 * radius)][edge]


def movers(rng: np.random.Generator, settings: VideoSettings) -> list[Mover]:
    """The objects of one video and their paths."""
    width, height = settings.size
    short = min(width, height)
    count = int(rng.integers(settings.objects[0], settings.objects[1] + 1))
    n_pairs = len(pair_names())
    found: list[Mover] = []
    while len(found) < count:
        radius = rng.uniform(*settings.radius) * short
        pair = int(rng.integers(n_pairs))
        first = 0 if rng.random() < 0.6 else int(rng.integers(0, settings.frames // 2))
        last = (
            settings.frames - 1
            if rng.random() < 0.6
            else int(rng.integers(first + settings.frames // 3, settings.frames))
        )
        start = _point(rng, width, height, radius, outside=first > 0 or rng.random() < 0.3)
        end = _point(rng, width, height, radius, outside=last < settings.frames - 1 or rng.random() < 0.3)
        bend = rng.uniform(-0.3, 0.3) * short if rng.random() < settings.curved else 0.0
        jitter = rng.integers(-15, 16, 3)
        colour = tuple(int(c) for c in np.clip(np.array(COLOURS[pair_names()[pair].split(" ")[0]]) + jitter, 0, 255))
        angle = float(rng.uniform(-15, 15))
        found.append(Mover(len(found) + 1, pair, radius, angle, start, end, first, last, bend, colour))  # type: ignore[arg-type]
        if len(found) < count and rng.random() < settings.twins:
            gap = 2.6 * radius  # a twin beside it: the same pair and path, shifted sideways
            dx, dy = end[0] - start[0], end[1] - start[1]
            length = math.hypot(dx, dy) or 1.0
            shift = (-gap * dy / length, gap * dx / length)
            twin_start = (start[0] + shift[0], start[1] + shift[1])
            twin_end = (end[0] + shift[0], end[1] + shift[1])
            found.append(Mover(len(found) + 1, pair, radius, -angle, twin_start, twin_end, first, last, bend, colour))  # type: ignore[arg-type]
    return found


def _polygon_area(points: list[tuple[float, float]]) -> float:
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def render_frame(
    objects: list[Mover], frame: int, base: np.ndarray, rng: np.random.Generator, settings: VideoSettings
) -> tuple[np.ndarray, list[TruthBox]]:
    """Frame ``frame``: (H, W, 3) uint8 and the ground truth, objects drawn in order (later on top)."""
    height, width = base.shape[:2]
    names = pair_names()
    canvas = base.copy()
    owner = np.full((height, width), -1, dtype=np.int64)
    areas: dict[int, float] = {}
    for k, mover in enumerate(objects):
        centre = mover.centre(frame)
        if centre is None:
            continue
        shape = names[mover.pair].split(" ")[1]
        points = outline(shape, centre[0], centre[1], mover.radius, 0.0 if shape == "circle" else mover.angle)
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon(points, fill=1)
        inside = np.asarray(mask, dtype=bool)
        canvas[inside] = mover.colour
        owner[inside] = k
        areas[k] = _polygon_area(points)
    if settings.grain > 0:
        canvas = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * settings.grain
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    truth = []
    for k, area in areas.items():
        ys, xs = np.nonzero(owner == k)
        if len(xs) and len(xs) >= settings.min_visible * area:
            box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
            truth.append(TruthBox(objects[k].track_id, objects[k].pair, box))
    return image, truth


def _plan(seed: int, settings: VideoSettings) -> tuple[np.random.Generator, np.ndarray, list[Mover]]:
    """Video ``seed``'s random state (for the frames' grain), background (H, W, 3) and objects."""
    rng = np.random.default_rng([seed, 7])
    width, height = settings.size
    kind = ("flat", "gradient", "noise")[int(rng.integers(3))]
    base = background(kind, height, width, rng).astype(np.float32)
    return rng, base, movers(rng, settings)


def shapes_video(seed: int, settings: VideoSettings | None = None) -> Iterator[tuple[np.ndarray, list[TruthBox]]]:
    """Each frame of video ``seed`` with its ground truth, one at a time."""
    settings = settings or VideoSettings()
    rng, base, objects = _plan(seed, settings)
    for frame in range(settings.frames):
        yield render_frame(objects, frame, base, rng, settings)


def video_pairs(seed: int, settings: VideoSettings | None = None) -> list[str]:
    """The pairs (e.g. "red circle") that appear in video ``seed``, in ``pair_names`` order: its label list."""
    _, _, objects = _plan(seed, settings or VideoSettings())
    names = pair_names()
    return [names[p] for p in sorted({m.pair for m in objects})]


def write_shapes_video(
    path: str | os.PathLike[str], seed: int, settings: VideoSettings | None = None, quality: int = 16
) -> list[list[TruthBox]]:
    """Writes video ``seed`` to ``path`` (.mp4 / .mkv: H.264 at constant rate factor ``quality``,
    .avi: Motion JPEG); returns each frame's ground truth."""
    settings = settings or VideoSettings()
    truth = []
    with VideoWriter(Path(path), settings.size[0], settings.size[1], settings.fps, quality=quality) as writer:
        for i, (image, boxes) in enumerate(shapes_video(seed, settings)):
            writer.write(image, i / settings.fps)
            truth.append(boxes)
    return truth


def truth_mot(truth: list[list[TruthBox]], pair: int | None = None) -> str:
    """The ground truth as a MOTChallenge gt file (``frame,id,x,y,w,h,1,1,1``, 1-based frames and
    pixels), of one pair or all."""
    lines = []
    for frame, boxes in enumerate(truth, start=1):
        for b in boxes:
            if pair is None or b.pair == pair:
                x0, y0, x1, y1 = b.box
                lines.append(f"{frame},{b.track_id},{x0 + 1:.2f},{y0 + 1:.2f},{x1 - x0:.2f},{y1 - y0:.2f},1,1,1\n")
    return "".join(lines)
