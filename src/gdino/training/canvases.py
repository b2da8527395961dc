"""Large canvases of many small coloured shapes among clutter, with COCO files: the proof of tiled detection.

A canvas (e.g. 3000x2000 or 6000x4000 pixels) holds ``CanvasSettings.shapes`` colour-shape pairs
(``gdino.training.shapes``: "red circle", "blue star", ...) of 15-60 pixels, none touching
another, over a flat, gradient or noise background strewn with clutter: grey-ish polygons and
lines that are no pair. Resized whole to a model's input, the shapes shrink to a few pixels;
detected in tiles (``gdino.inference.tiled``) they keep the size the shapes model was trained
on. Boxes are the tight pixel bounds of each shape; category ids are ``pair_names`` order + 1,
as in the shapes data set. A canvas depends only on its settings and the random generator.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from gdino.training.shapes import COLOURS, background, outline, pair_names

CANVAS_BACKGROUNDS = ("flat", "gradient", "noise")


@dataclass(frozen=True)
class CanvasSettings:
    """What a canvas looks like.

    Attributes:
        size: (width, height) in pixels.
        shapes: how many shapes to place (fewer when there is no room).
        shape_size: (smallest, largest) side of a shape's box, in pixels.
        clutter: how many distractors (muted polygons and lines) to draw under the shapes.
        gap: the fewest pixels between two shapes' boxes.
        max_rotation: the most a shape is turned, degrees either way.
        colour_jitter: the most each channel of a shape's colour moves.
        grain: standard deviation of the noise added to the whole canvas (0 for none).
        backgrounds: the kinds to choose from (``gdino.training.shapes.background``).
    """

    size: tuple[int, int] = (3000, 2000)
    shapes: int = 150
    shape_size: tuple[int, int] = (15, 60)
    clutter: int = 300
    gap: int = 8
    max_rotation: float = 15.0
    colour_jitter: int = 20
    grain: float = 3.0
    backgrounds: tuple[str, ...] = CANVAS_BACKGROUNDS


Spot = tuple[float, float, float]  # (cx, cy, radius) of a shape in pixels


@dataclass(frozen=True)
class Canvas:
    """One canvas: (H, W, 3) uint8, its (N, 4) xyxy pixel boxes, each box's pair index, its background.

    Unlike the shapes data set's ``Scene`` it keeps no full-size masks (150 of a 6000x4000 canvas
    would take 3.6 GB).
    """

    image: np.ndarray
    boxes: np.ndarray
    pairs: tuple[int, ...]
    background: str


def place_shapes(rng: np.random.Generator, settings: CanvasSettings) -> list[Spot]:
    """Up to ``settings.shapes`` spots inside the canvas whose boxes keep ``gap`` pixels apart."""
    width, height = settings.size
    low, high = settings.shape_size
    boxes = np.zeros((0, 4))
    spots: list[Spot] = []
    for _ in range(settings.shapes * 20):
        if len(spots) == settings.shapes:
            break
        radius = rng.uniform(low, high) / 2
        cx, cy = rng.uniform(radius + 1, width - radius - 1), rng.uniform(radius + 1, height - radius - 1)
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        grown = box + np.array([-settings.gap, -settings.gap, settings.gap, settings.gap])
        apart = (
            (boxes[:, 0] >= grown[2])
            | (boxes[:, 2] <= grown[0])
            | (boxes[:, 1] >= grown[3])
            | (boxes[:, 3] <= grown[1])
        )
        if apart.all():
            boxes = np.vstack([boxes, box])
            spots.append((cx, cy, radius))
    return spots


def render_canvas(
    rng: np.random.Generator,
    settings: CanvasSettings,
    spots: Sequence[Spot] | None = None,
    pairs: Sequence[int] | None = None,
) -> Canvas:
    """One canvas: its (H, W, 3) uint8 image, (N, 4) xyxy boxes and each shape's pair index.

    Args:
        rng: all randomness.
        settings: size, counts and looks.
        spots: where the shapes go (``place_shapes`` when None), e.g. on tile borders.
        pairs: the pairs shapes are drawn from (indices into ``pair_names``; every pair when None).
    """
    width, height = settings.size
    kind = settings.backgrounds[int(rng.integers(len(settings.backgrounds)))]
    canvas = background(kind, height, width, rng).copy()
    _draw_clutter(canvas, rng, settings)
    choices = list(range(len(pair_names()))) if pairs is None else list(pairs)
    boxes, chosen = [], []
    for cx, cy, radius in place_shapes(rng, settings) if spots is None else spots:
        pair = int(choices[int(rng.integers(len(choices)))])
        box = _draw_shape(canvas, rng, settings, pair, (cx, cy, radius))
        if box is not None:
            boxes.append(box)
            chosen.append(pair)
    if settings.grain > 0:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * settings.grain
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return Canvas(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(chosen), kind)


def _draw_shape(
    canvas: np.ndarray, rng: np.random.Generator, settings: CanvasSettings, pair: int, spot: Spot
) -> list[float] | None:
    """Paints one shape into the (H, W, 3) float canvas; its tight box, None if nothing of it is inside."""
    colour_name, shape = pair_names()[pair].split(" ")
    jitter = rng.integers(-settings.colour_jitter, settings.colour_jitter + 1, 3)
    colour = np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255)
    angle = 0.0 if shape == "circle" else rng.uniform(-settings.max_rotation, settings.max_rotation)
    cx, cy, radius = spot
    x0, y0 = max(0, math.floor(cx - radius) - 1), max(0, math.floor(cy - radius) - 1)
    x1 = min(canvas.shape[1], math.ceil(cx + radius) + 2)
    y1 = min(canvas.shape[0], math.ceil(cy + radius) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    patch = Image.new("L", (x1 - x0, y1 - y0), 0)  # the shape's neighbourhood only, not a canvas-sized mask
    ImageDraw.Draw(patch).polygon(outline(shape, cx - x0, cy - y0, radius, angle), fill=1)
    inside = np.asarray(patch, dtype=bool)  # (h, w)
    ys, xs = np.nonzero(inside)
    if not len(xs):
        return None
    canvas[y0:y1, x0:x1][inside] = colour
    return [float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)]


def _draw_clutter(canvas: np.ndarray, rng: np.random.Generator, settings: CanvasSettings) -> None:
    """Muted (grey-ish) irregular polygons and lines of 10-80 pixels over the (H, W, 3) float canvas."""
    height, width = canvas.shape[:2]
    layer = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(settings.clutter):
        grey = rng.uniform(50, 210)
        colour = tuple(int(np.clip(grey + rng.uniform(-18, 18), 0, 255)) for _ in range(3))
        cx, cy, size = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 80)
        if rng.random() < 0.3:
            angle = rng.uniform(0, math.pi)
            dx, dy = size * math.cos(angle) / 2, size * math.sin(angle) / 2
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=int(rng.integers(1, 5)))
            continue
        corners = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        radii = rng.uniform(0.3, 0.5, corners) * size
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)], fill=colour)
    canvas[...] = np.asarray(layer, dtype=np.float32)


def coco_categories() -> list[dict[str, Any]]:
    """Every colour-shape pair as a COCO category, id = ``pair_names`` index + 1."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(pair_names())]


def write_canvases(out: str | Path, count: int, settings: CanvasSettings, seed: int = 0) -> Path:
    """Writes ``count`` canvases as ``out/canvas_000.png``... and ``out/instances.json`` (COCO); returns it.

    Canvas ``i`` depends only on ``(seed, i)`` and the settings.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        scene = render_canvas(np.random.default_rng([seed, i]), settings)
        name = f"canvas_{i:03d}.png"
        Image.fromarray(scene.image).save(folder / name)
        height, width = scene.image.shape[:2]
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        for (x0, y0, x1, y1), pair in zip(scene.boxes.tolist(), scene.pairs):
            box = [x0, y0, x1 - x0, y1 - y0]
            annotation = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": pair + 1, "bbox": box}
            annotations.append({**annotation, "area": box[2] * box[3], "iscrowd": 0})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": coco_categories()}))
    return path
