"""Tiled ("sliced") detection, the numpy core: the tiles of a large image, their detections mapped back
to the image's pixels, and the merge of overlapping boxes, as SAHI does it (``sahi`` 0.12.8,
``get_sliced_prediction``). Nothing here runs a model or imports torch.

Small objects vanish when a large image is resized to the model's input; run the model on tiles of
``TileSettings.size`` pixels instead (``tile_grid``), optionally on the whole image too
(``needs_full_pass``), map each tile's ``Detections`` onto the image (``to_image``) and merge the
boxes that one object left in several tiles (``merge_tiles``, ``merge_detections``).

The grid: tiles of ``size`` x ``size`` pixels, ``ceil(overlap * size)`` pixels shared by two
neighbours (SAHI takes ``int(overlap * size)``; the two agree whenever that product is whole), in
row-major order; the last column and row are shifted left and up to end on the image's border, so
no tile is padded or reaches past it. Along a side shorter than ``size`` the tile is the whole side:
an image smaller than a tile is one tile, the image itself, and then needs no full-image pass.

The merge, within each label (boxes of different labels never merge), reproduces SAHI's
``GreedyNMMPostprocess`` / ``NMSPostprocess`` with ``class_agnostic=False``, rule for rule:

- order: best score first; equal scores by x0, then y0, x1, y1 (smallest first); then by position
  in the input (tiles in grid order, the full-image pass last) (``sahi_order``);
- a match is an overlap (IoS or IoU, float32) at least ``match_threshold`` (``>=``);
- greedy NMM: each box not yet taken is kept and takes every later free box that matches it, as it
  was given (not grown); the kept box then absorbs its matches in order, each re-checked against
  the box grown so far: a match becomes part of the union box, a box that no longer matches is
  dropped (not kept on its own). The result has the kept box's score (the best) and label;
- NMS: each box not yet dropped is kept and drops every box that matches it (by IoU).

SAHI's re-check compares a float64 overlap with the threshold, this module's the same overlap
rounded to float32, so the two can differ only for an overlap within a float32 rounding of the
threshold (the match step is float32 in both, bit for bit). The result is a ``Detections`` best first (ties in
label order, then in the order above).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gdino.inference.detections import Detections
from gdino.inference.postprocess import box_ios, box_iou, class_nms
from gdino.utils.checks import check_fraction

Tile = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels of the image, x1 and y1 exclusive

MIN_TILE_SIZE = 32  # smaller tiles would be upscaled over 25 times to the model's 800-pixel input
MAX_OVERLAP = 0.9  # exclusive: just below it, tiles still step 3 pixels or more
# The merge rules and the overlaps each matches by, its default first.
MERGE_METRICS: dict[str, tuple[str, ...]] = {"greedynmm": ("ios", "iou"), "nms": ("iou",)}
OVERLAPS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"ios": box_ios, "iou": box_iou}


# --------------------------------------------------------------------------- settings and grid


@dataclass(frozen=True)
class TileSettings:
    """How to tile an image and merge the tiles' boxes.

    Attributes:
        size: the side of a (square) tile in pixels, at least ``MIN_TILE_SIZE``.
        overlap: the share of ``size`` two neighbouring tiles have in common, in [0, 0.9).
        full_image: also detect on the whole image (for the objects larger than a tile) and merge.
        merge: "greedynmm" (merge matching boxes into their union, SAHI's default) or "nms" (keep
            the best of matching boxes).
        match_threshold: the overlap, in (0, 1], at which two boxes of a label match.
        match_metric: "ios" (intersection over the smaller box) or "iou"; "auto" (the default)
            is "ios" for greedynmm and "iou" for nms, and nms takes "iou" only.

    Raises:
        ValueError: a setting out of its range, naming it.
    """

    size: int
    overlap: float = 0.2
    full_image: bool = True
    merge: str = "greedynmm"
    match_threshold: float = 0.5
    match_metric: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _whole(self.size, "size", MIN_TILE_SIZE))
        object.__setattr__(self, "overlap", _overlap_ratio(self.overlap))
        if not isinstance(self.full_image, bool):
            raise ValueError(f"full_image must be True or False, got {self.full_image!r}")
        if self.merge not in MERGE_METRICS:
            raise ValueError(f"merge must be one of {', '.join(map(repr, MERGE_METRICS))}, got {self.merge!r}")
        threshold = check_fraction(self.match_threshold, "match_threshold")
        if threshold == 0:
            raise ValueError("match_threshold must be above 0 (at 0 every box of a label would match every other)")
        object.__setattr__(self, "match_threshold", threshold)
        metrics = MERGE_METRICS[self.merge]
        metric = metrics[0] if self.match_metric == "auto" else self.match_metric
        if metric not in metrics:
            raise ValueError(
                f"match_metric must be 'auto' or one of {', '.join(map(repr, metrics))} for merge {self.merge!r},"
                f" got {self.match_metric!r}"
            )
        object.__setattr__(self, "match_metric", metric)

    def describe(self) -> str:
        """The settings in one line, e.g. "640 overlap 0.2 greedynmm ios 0.5 full" (a run's journal, logs)."""
        full = "full" if self.full_image else "tiles only"
        return f"{self.size} overlap {self.overlap:g} {self.merge} {self.match_metric} {self.match_threshold:g} {full}"

    @property
    def overlap_pixels(self) -> int:
        """The pixels two neighbouring tiles share: ``overlap * size`` rounded up (at least the ratio asked)."""
        return math.ceil(self.overlap * self.size - 1e-9)  # 1e-9: 0.07 * 100 is 7.000000000000001


def _whole(value: object, name: str, minimum: int) -> int:
    """``value`` as an int when it is a whole number (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum} pixels, got {value!r}")
    return int(value)


def _overlap_ratio(value: object) -> float:
    """``value`` as a float when it is a real number in [0, ``MAX_OVERLAP``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"overlap must be a number in [0, {MAX_OVERLAP}), got {value!r} ({type(value).__name__})")
    number = float(value)
    if not 0.0 <= number < MAX_OVERLAP:  # NaN fails too
        raise ValueError(f"overlap must be in [0, {MAX_OVERLAP}), got {value!r}")
    return number


def _starts(length: int, size: int, step: int) -> list[int]:
    """Where the tiles start along a side of ``length`` pixels: every ``step`` while a tile ends
    inside the side, then one ending on its border; a single 0 when the side is at most ``size``."""
    if length <= size:
        return [0]
    return [*range(0, length - size, step), length - size]


def tile_grid(width: int, height: int, settings: TileSettings) -> list[Tile]:
    """The tiles that cover a ``width`` x ``height`` image, row-major (left to right, then down).

    Each tile is ``size`` pixels a side, or the image's whole side where that is shorter; neighbours
    share at least ``settings.overlap_pixels``; the last column and row end on the border.

    Raises:
        ValueError: a width or height that is not a whole number of at least 1 pixel.
    """
    width, height = _whole(width, "width", 1), _whole(height, "height", 1)
    step = settings.size - settings.overlap_pixels  # >= 3: overlap < 0.9 and size >= 32
    tile_w, tile_h = min(settings.size, width), min(settings.size, height)
    return [
        (x, y, x + tile_w, y + tile_h)
        for y in _starts(height, settings.size, step)
        for x in _starts(width, settings.size, step)
    ]


def needs_full_pass(tiles: Sequence[Tile], settings: TileSettings) -> bool:
    """Whether to detect on the whole image too: when asked and the image is more than one tile
    (one tile is the whole image already). SAHI's rule: ``num_slices > 1 and perform_standard_pred``."""
    return settings.full_image and len(tiles) > 1


# --------------------------------------------------------------------------- tiles -> image


def to_image(found: Detections, tile: Tile, image_size: tuple[int, int]) -> Detections:
    """One tile's detections, in the tile's pixels, in the pixels of the (width, height) image: boxes
    shifted by the tile's corner and clipped to the image.

    Raises:
        ValueError: ``found`` is not of the tile's size.
    """
    x0, y0, x1, y1 = tile
    if tuple(found.image_size) != (x1 - x0, y1 - y0):
        raise ValueError(f"detections of a {found.image_size} image given for the {x1 - x0}x{y1 - y0} tile {tile}")
    width, height = image_size
    shift = np.array([x0, y0, x0, y0], dtype=np.float32)
    bound = np.array([width, height, width, height], dtype=np.float32)
    boxes = np.clip(np.asarray(found.boxes, dtype=np.float32).reshape(-1, 4) + shift, 0, bound)  # (N, 4)
    return Detections(boxes.astype(np.float32), found.scores, found.labels, found.label_ids, image_size)


def concatenate(parts: Sequence[Detections], image_size: tuple[int, int]) -> Detections:
    """The detections of several passes over one (width, height) image as one, in the passes' order."""
    if not parts:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), (), np.zeros(0, np.int64), image_size)
    return Detections(
        np.concatenate([np.asarray(p.boxes, dtype=np.float32).reshape(-1, 4) for p in parts]),  # (N, 4)
        np.concatenate([np.asarray(p.scores, dtype=np.float32) for p in parts]),
        tuple(label for p in parts for label in p.labels),
        np.concatenate([np.asarray(p.label_ids, dtype=np.int64) for p in parts]),
        image_size,
    )


def merge_tiles(
    per_tile: Sequence[Detections],
    tiles: Sequence[Tile],
    image_size: tuple[int, int],
    settings: TileSettings,
    full: Detections | None = None,
) -> Detections:
    """One image's detections from its tiles' (each in its tile's pixels) and, if given, the
    whole image's: mapped onto the image, concatenated (tiles in order, the full pass last, as SAHI)
    and merged (``merge_detections``).

    Raises:
        ValueError: not one ``Detections`` per tile, or one not of its tile's (or the image's) size.
    """
    if len(per_tile) != len(tiles):
        raise ValueError(f"{len(per_tile)} detections for {len(tiles)} tiles")
    parts = [to_image(found, tile, image_size) for found, tile in zip(per_tile, tiles)]
    if full is not None:
        if tuple(full.image_size) != tuple(image_size):
            raise ValueError(f"full-image detections of a {full.image_size} image for a {image_size} image")
        parts.append(full)
    return merge_detections(concatenate(parts, image_size), settings)


# --------------------------------------------------------------------------- merging


def merge_detections(found: Detections, settings: TileSettings) -> Detections:
    """``found`` with the boxes of each label that match merged (greedynmm) or suppressed (nms), best first."""
    boxes = np.asarray(found.boxes, dtype=np.float32).reshape(-1, 4)  # (N, 4)
    scores = np.asarray(found.scores, dtype=np.float32)
    ids = np.asarray(found.label_ids, dtype=np.int64)
    if settings.merge == "nms":
        keep = sahi_nms(boxes, scores, ids, settings.match_threshold)
        merged = boxes[keep]
    else:
        keep, merged = greedy_nmm(boxes, scores, ids, settings.match_metric, settings.match_threshold)
    return Detections(merged, scores[keep], tuple(found.labels[i] for i in keep), ids[keep], found.image_size)


def sahi_order(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(N,) indices of (N, 4) boxes, best (N,) score first; equal scores by x0, then y0, x1, y1,
    smallest first; then by index. SAHI's ``np.lexsort((y2, x2, y1, x1, -scores))``, in float32."""
    b = np.asarray(boxes, dtype=np.float32)
    return np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], -np.asarray(scores, dtype=np.float32)))


def sahi_nms(boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """SAHI's NMS within each label id: in ``sahi_order``, a box goes when its IoU with a kept box
    is at least ``threshold``.

    ``class_nms`` is that rule with a strict ``>``: given the boxes in SAHI's order (its ties keep
    the earlier box) and the float32 just below the threshold, it keeps the same boxes.

    Returns:
        The kept indices (int64) into the (N, 4) boxes, best score first (ties in label order).
    """
    order = sahi_order(boxes, scores)
    below = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # iou > below <=> iou >= threshold
    return order[class_nms(boxes[order], scores[order], ids[order], below)].astype(np.int64)


def greedy_nmm(
    boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, metric: str, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """SAHI's greedy non-maximum merging within each label id (the module's docstring has the rules).

    Args:
        boxes: (N, 4) float32 xyxy; scores: (N,); ids: (N,) label ids.
        metric: "ios" or "iou"; threshold: a match is an overlap of at least this.

    Returns:
        ``(keep, merged)``: (K,) int64 indices of the kept boxes, best score first (ties in label
        order, then in ``sahi_order``), and (K, 4) float32 their merged boxes.
    """
    keep: list[int] = []
    merged: list[np.ndarray] = []
    for label in np.unique(ids):
        group = np.flatnonzero(ids == label)
        for keeper, members in _greedy_match(boxes[group], scores[group], metric, threshold):
            keep.append(int(group[keeper]))
            merged.append(_grow(boxes[group[keeper]], boxes[group[members]], metric, threshold))
    index = np.asarray(keep, dtype=np.int64)
    order = np.argsort(-scores[index], kind="stable")
    return index[order], np.asarray(merged, dtype=np.float32).reshape(-1, 4)[order]


def _greedy_match(boxes: np.ndarray, scores: np.ndarray, metric: str, threshold: float) -> list[tuple[int, np.ndarray]]:
    """SAHI's greedy matching of one label's (N, 4) boxes: in ``sahi_order``, each box not yet taken
    is kept and takes every later free box whose overlap with it (as given) is at least ``threshold``.

    Returns:
        ``(keeper, members)`` in that order: indices into ``boxes``, the members (M,) in order.
    """
    overlap = OVERLAPS[metric]
    limit = np.float32(threshold)  # SAHI compares its float32 overlaps with the threshold in float32
    order = sahi_order(boxes, scores)
    free = np.ones(len(order), dtype=bool)  # (N,) by position in ``order``
    groups = []
    for position, keeper in enumerate(order):
        if not free[position]:
            continue
        free[position] = False
        later = np.flatnonzero(free)  # every free position is after this one
        taken = later[overlap(boxes[keeper][None], boxes[order[later]])[0] >= limit]
        free[taken] = False
        groups.append((int(keeper), order[taken]))
    return groups


def _grow(box: np.ndarray, members: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """(4,) the union of ``box`` and each of its (M, 4) ``members``, in order, that overlaps the
    union so far by at least ``threshold`` (SAHI's re-check); a member that no longer does is dropped."""
    overlap = OVERLAPS[metric]
    grown = np.asarray(box, dtype=np.float64)  # the union of float32 corners: exact in float32 too
    for member in np.asarray(members, dtype=np.float64):
        if overlap(grown[None], member[None])[0, 0] >= threshold:
            grown = np.concatenate([np.minimum(grown[:2], member[:2]), np.maximum(grown[2:], member[2:])])
    return grown.astype(np.float32)
