"""A synthetic grounding data set: coloured shapes on varied backgrounds, in COCO files.

Every image holds 1-6 objects, each a colour-shape pair ("red circle", "blue square", ...) of
varied size and slight rotation, on a flat, gradient, noise or photo-crop background; objects
may touch (a later-drawn object hides what it covers). Boxes are the tight pixel bounds of what is
visible of each object, and ``masks=True`` adds each object's visible pixels as COCO ``segmentation``
polygons (the area is then the mask's, not the box's). The output is
deterministic for a seed (and the same photos): image ``i`` of a split depends only on
``(seed, split, i)``.

``held_out`` pairs (e.g. "green triangle") never appear in the training split, whose category
list leaves them out so that no training caption names them, even as a negative; the
``held_out`` split has at least one of them in every image, and lists every pair, so AP on
those categories measures grounding of colour and shape rather than memorised classes.
Category ids are the same in every split (1.. in :func:`pair_names` order).

Photos are crops of the images given, or of the project's example photos found at run time
(:func:`find_photos`); without any, photo backgrounds are replaced by the other kinds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
HELD_OUT: tuple[str, ...] = ("green triangle", "orange star", "purple circle")
# Concepts ``gdino-shapes`` never saw, for the forgetting benchmark (``gdino.training.forgetting_data``):
# a new colour on the old shapes and a new shape in every colour.
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (245, 120, 195)}
NEW_SHAPES: tuple[str, ...] = ("hexagon",)
ALL_COLOURS: dict[str, tuple[int, int, int]] = COLOURS | NEW_COLOURS
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "photo")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "held_out": 2}


def pair_names() -> list[str]:
    """Every colour-shape pair, colour-major: ``["red circle", "red square", ...]``; id = index + 1."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


@dataclass(frozen=True)
class ShapesSettings:
    """What the generated images look like.

    Attributes:
        image_size: (smallest, largest) width and height, each drawn in this range.
        objects: (fewest, most) objects an image.
        radius: (smallest, largest) object radius, a fraction of the image's shorter side.
        max_rotation: the most a shape is turned, degrees either way.
        max_overlap: the most one object's box may overlap another's (fraction of the smaller).
        colour_jitter: the most each channel of an object's colour moves.
        grain: standard deviation of the noise added to the whole image (0 for none).
        backgrounds: the kinds to choose from.
        held_out: the pairs left out of training.
    """

    image_size: tuple[int, int] = (256, 384)
    objects: tuple[int, int] = (1, 6)
    radius: tuple[float, float] = (0.06, 0.2)
    max_rotation: float = 15.0
    max_overlap: float = 0.1
    colour_jitter: int = 20
    grain: float = 3.0
    backgrounds: tuple[str, ...] = BACKGROUNDS
    held_out: tuple[str, ...] = HELD_OUT


@dataclass(frozen=True)
class Scene:
    """One generated image: (H, W, 3) uint8, its (N, 4) xyxy pixel boxes, each box's pair index and
    (N, H, W) bool masks of each object's visible pixels (the boxes are their tight bounds)."""

    image: np.ndarray
    boxes: np.ndarray
    pairs: tuple[int, ...]
    background: str
    masks: np.ndarray


# --------------------------------------------------------------------------- photos


def find_photos(extra: Sequence[str | Path] = ()) -> list[Path]:
    """Photos for backgrounds: the images in ``extra`` folders/files, else the project's photos
    (``tests/data/``, and ``../shared/data/images`` beside the repository), looked up when called.
    Duplicate file names count once; sorted by name, so the choice is stable."""
    repo = Path(__file__).resolve().parents[3]
    places = [Path(p) for p in extra] or [repo / "tests" / "data", repo.parent / "shared" / "data" / "images"]
    found: dict[str, Path] = {}
    for place in places:
        files = [place] if place.is_file() else sorted(place.glob("*")) if place.is_dir() else []
        for f in files:
            if f.suffix.lower() in (".png", ".jpg", ".jpeg") and f.name not in found:
                found[f.name] = f
    return [found[name] for name in sorted(found)]


def load_photos(paths: Sequence[Path]) -> list[np.ndarray]:
    """The photos as RGB arrays (unreadable ones logged and left out)."""
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img.convert("RGB")))
        except OSError as e:
            logger.warning("shapes: photo %s left out: %s", path, e)
    return out


# --------------------------------------------------------------------------- backgrounds


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour (grey plus a little tint), so that objects stand out by colour."""
    return np.clip(rng.uniform(40, 220) + rng.uniform(-30, 30, 3), 0, 255)


def background(
    kind: str, height: int, width: int, rng: np.random.Generator, photos: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """A ``(height, width, 3)`` float background of the given kind."""
    if kind == "flat":
        return np.broadcast_to(_muted(rng), (height, width, 3)).astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (np.arange(width, dtype=np.float32) * math.cos(angle))[None, :] + (
            np.arange(height, dtype=np.float32) * math.sin(angle)
        )[:, None]  # (H, W)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1.0))[..., None]
        start, end = _muted(rng).astype(np.float32), _muted(rng).astype(np.float32)
        return start + t * (end - start)
    if kind == "noise":
        cells = rng.normal(0, rng.uniform(10, 40), (max(2, height // 16), max(2, width // 16), 3))
        blobs = (
            np.asarray(
                Image.fromarray(np.clip(cells + 128, 0, 255).astype(np.uint8)).resize(
                    (width, height), Image.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )
            - 128
        )
        fine = rng.standard_normal((height, width, 3), dtype=np.float32) * rng.uniform(3, 15)
        return np.clip(_muted(rng).astype(np.float32) + blobs + fine, 0, 255)
    if kind == "photo":
        return _photo_crop(photos[int(rng.integers(len(photos)))], height, width, rng)
    raise ValueError(f"unknown background kind {kind!r}; choose from {', '.join(BACKGROUNDS)}")


def _photo_crop(photo: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` (at least a third of each side), resized and half desaturated."""
    ph, pw = photo.shape[:2]
    h, w = int(rng.integers(max(1, ph // 3), ph + 1)), int(rng.integers(max(1, pw // 3), pw + 1))
    top, left = int(rng.integers(0, ph - h + 1)), int(rng.integers(0, pw - w + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[top : top + h, left : left + w]))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(crop.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return 0.5 * arr + 0.5 * arr.mean(-1, keepdims=True)


# --------------------------------------------------------------------------- shapes


def outline(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """The polygon of a shape (a circle: 64 points) centred at ``(cx, cy)``, turned ``angle`` degrees."""
    turn = math.radians(angle)
    if shape == "circle":
        corners, radii, start = 64, [radius], 0.0
    elif shape == "square":
        corners, radii, start = 4, [radius], math.pi / 4
    elif shape == "triangle":
        corners, radii, start = 3, [radius], -math.pi / 2
    elif shape == "star":
        corners, radii, start = 10, [radius, 0.45 * radius], -math.pi / 2
    elif shape == "hexagon":
        corners, radii, start = 6, [radius], 0.0
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES + NEW_SHAPES)}")
    points = []
    for k in range(corners):
        a = start + turn + 2 * math.pi * k / corners
        r = radii[k % len(radii)]
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """The largest intersection of ``box`` with any of ``others``, as a fraction of the smaller box."""
    worst = 0.0
    for other in others:
        w = min(box[2], other[2]) - max(box[0], other[0])
        h = min(box[3], other[3]) - max(box[1], other[1])
        if w > 0 and h > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
            worst = max(worst, w * h / smaller)
    return worst


def _place(
    rng: np.random.Generator, height: int, width: int, settings: ShapesSettings, placed: list[np.ndarray]
) -> tuple[float, float, float] | None:
    """Centre and radius of a new object inside the image, overlapping the others little; None if no room."""
    short = min(height, width)
    for _ in range(50):
        radius = max(6.0, rng.uniform(*settings.radius) * short)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        box = np.array([cx - radius, cy - radius, cx + radius, cy + radius])
        if _overlap(box, placed) <= settings.max_overlap:
            placed.append(box)
            return cx, cy, radius
    return None


def render(
    rng: np.random.Generator,
    pairs: Sequence[int],
    settings: ShapesSettings,
    photos: Sequence[np.ndarray] = (),
    first: Sequence[int] = (),
    names: Sequence[str] | None = None,
) -> Scene:
    """One image of objects whose pairs are drawn from ``pairs`` (indices into ``names``).

    Args:
        rng: all randomness.
        pairs: the pairs objects may be.
        settings: sizes, counts and backgrounds.
        photos: photos for "photo" backgrounds.
        first: the first object's pair is drawn from these instead (e.g. the held-out pairs).
        names: the "colour shape" pairs the indices refer to (:func:`pair_names` when None); colours
            and shapes from :data:`ALL_COLOURS` and :func:`outline`.
    """
    names = pair_names() if names is None else names
    width, height = (int(rng.integers(settings.image_size[0], settings.image_size[1] + 1)) for _ in range(2))
    kinds = [k for k in settings.backgrounds if k != "photo" or photos] or ["flat"]
    kind = kinds[int(rng.integers(len(kinds)))]
    canvas = background(kind, height, width, rng, photos).copy()
    owner = np.full((height, width), -1, dtype=np.int64)
    chosen: list[int] = []
    placed: list[np.ndarray] = []
    for k in range(int(rng.integers(settings.objects[0], settings.objects[1] + 1))):
        choices = first if (k == 0 and len(first)) else pairs
        pair = int(choices[int(rng.integers(len(choices)))])
        spot = _place(rng, height, width, settings, placed)
        if spot is None:
            continue
        colour_name, shape = names[pair].split(" ")
        jitter = rng.integers(-settings.colour_jitter, settings.colour_jitter + 1, 3)
        colour = np.clip(np.array(ALL_COLOURS[colour_name]) + jitter, 0, 255)
        angle = 0.0 if shape == "circle" else rng.uniform(-settings.max_rotation, settings.max_rotation)
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon(outline(shape, *spot, angle), fill=1)
        inside = np.asarray(mask, dtype=bool)
        canvas[inside] = colour
        owner[inside] = len(chosen)
        chosen.append(pair)
    if settings.grain > 0:
        canvas = canvas + rng.standard_normal(canvas.shape, dtype=np.float32) * settings.grain
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    boxes, kept, masks = [], [], []
    for k, pair in enumerate(chosen):
        visible = owner == k  # (H, W): what later objects left of this one
        ys, xs = np.nonzero(visible)
        if len(xs):
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            kept.append(pair)
            masks.append(visible)
    dense = np.stack(masks) if masks else np.zeros((0, height, width), bool)  # (N, H, W)
    return Scene(image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(kept), kind, dense)


# --------------------------------------------------------------------------- data set files


def _split_pairs(split: str, held: list[int], n_pairs: int) -> tuple[list[int], list[int], list[int]]:
    """(pairs objects may be, pairs the first object is drawn from, categories listed) of a split."""
    seen = [p for p in range(n_pairs) if p not in held]
    if split == "held_out":
        return list(range(n_pairs)), held, list(range(n_pairs))
    return seen, [], seen if split == "train" else list(range(n_pairs))


def write_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    settings: ShapesSettings,
    photos: Sequence[np.ndarray] = (),
    image_format: str = "jpg",
    masks: bool = False,
) -> Path:
    """Writes ``count`` images to ``out/<split>/`` and their COCO file ``out/<split>.json``; with
    ``masks``, each annotation also has the object's visible pixels as ``segmentation`` polygons and
    their count as ``area``."""
    names = pair_names()
    unknown = [p for p in settings.held_out if p not in names]
    if unknown:
        raise ValueError(f"held-out pairs {unknown} are not colour-shape pairs such as 'green triangle'")
    held = [names.index(p) for p in settings.held_out]
    if split == "held_out" and not held:
        raise ValueError("the held_out split needs held-out pairs")
    pairs, first, listed = _split_pairs(split, held, len(names))
    scenes = (
        render(np.random.default_rng([seed, SPLITS[split], i]), pairs, settings, photos, first) for i in range(count)
    )
    info = {"description": f"gdino synthetic shapes, split {split}", "seed": seed, "held_out": list(settings.held_out)}
    return write_scenes(out, split, scenes, names, listed, info, image_format=image_format, masks=masks)


def write_scenes(
    out: Path,
    split: str,
    scenes: Iterable[Scene],
    names: Sequence[str],
    listed: Sequence[int],
    info: dict[str, Any],
    annotated: Collection[int] | None = None,
    image_format: str = "jpg",
    masks: bool = False,
) -> Path:
    """Writes the scenes' images to ``out/<split>/`` and their COCO file ``out/<split>.json``.

    Args:
        out: the data set folder.
        split: the split's name (its image folder and file).
        scenes: the images, written as ``<split>/00000.jpg`` ... in order.
        names: the pair names the scenes' indices refer to (category id = index + 1).
        listed: the pairs listed as categories.
        info: the COCO file's ``info``.
        annotated: only objects of these pairs get annotations (all when None): the others are
            in the images but not in the file, as in a user's data set labelled for a few classes.
        image_format: ``"jpg"`` or ``"png"``.
        masks: also each annotation's ``segmentation`` polygons and the mask's ``area``.
    """
    (out / split).mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, scene in enumerate(scenes):
        file_name = f"{split}/{i:05d}.{image_format}"
        if image_format == "jpg":
            Image.fromarray(scene.image).save(out / file_name, quality=92)
        else:
            Image.fromarray(scene.image).save(out / file_name)
        height, width = scene.image.shape[:2]
        images.append({"id": i + 1, "file_name": file_name, "width": width, "height": height})
        shapes = _mask_fields(scene) if masks else [{} for _ in scene.pairs]
        for (x0, y0, x1, y1), pair, shape in zip(scene.boxes.tolist(), scene.pairs, shapes):
            if annotated is not None and pair not in annotated:
                continue
            w, h = x1 - x0, y1 - y0
            annotation = {
                "id": len(annotations) + 1,
                "image_id": i + 1,
                "category_id": pair + 1,
                "bbox": [x0, y0, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            annotations.append(annotation | shape)
    categories = [{"id": p + 1, "name": names[p], "supercategory": "shape"} for p in listed]
    path = out / f"{split}.json"
    path.write_text(
        json.dumps({"info": info, "images": images, "annotations": annotations, "categories": categories}) + "\n"
    )
    return path


def _mask_fields(scene: Scene) -> list[dict[str, Any]]:
    """Each object's ``segmentation`` (COCO polygons of its visible pixels) and ``area`` (their count)."""
    from gdino.inference.masks import Masks  # needs OpenCV (the gdino[masks] extra), only when asked

    found = Masks.from_dense(scene.masks)
    areas = found.areas()
    return [{"segmentation": found.polygons(k), "area": int(areas[k])} for k in range(len(found))]


def write_shapes_dataset(
    out: str | Path,
    counts: dict[str, int] | None = None,
    seed: int = 0,
    settings: ShapesSettings | None = None,
    photos: Sequence[str | Path] | None = None,
    image_format: str = "jpg",
    masks: bool = False,
) -> dict[str, Path]:
    """Writes the splits (``train``, ``val``, ``held_out``) under ``out``; returns each COCO file.

    Args:
        out: the output folder.
        counts: images per split (default 2000 / 200 / 200).
        seed: fixes every image.
        settings: what the images look like.
        photos: background photos (files or folders); :func:`find_photos` when ``None``.
        image_format: ``"jpg"`` (small files) or ``"png"`` (exact pixels).
        masks: also write each object's ``segmentation`` polygons (and the mask's ``area``).
    """
    counts = counts if counts is not None else {"train": 2000, "val": 200, "held_out": 200}
    unknown = set(counts) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {', '.join(SPLITS)}")
    settings = settings if settings is not None else ShapesSettings()
    arrays = load_photos(find_photos(photos or ()))
    if not arrays and "photo" in settings.backgrounds:
        logger.warning("shapes: no background photos found; using flat, gradient and noise backgrounds only")
    root = Path(out)
    return {
        split: write_split(root, split, n, seed, settings, arrays, image_format, masks) for split, n in counts.items()
    }
