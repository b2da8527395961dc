"""Masks for tiled detections: each box segmented on a crop around it, not on the whole large image.

A segmenter resizes its image to its input (1024 px for SAM 2.1 and SAM): a 30 px object of a
6000x4000 photo would be 5 px there, too small for a mask. So with tiles, each merged box is
segmented on a region of the image at tile scale, the way the detector saw it:

* the tiles of the same grid (``gdino.inference.tiles.tile_grid``) that wholly hold a box are its
  candidates; tiles are taken greedily, the one holding most boxes not yet placed first (ties: the
  first in grid order), so each used tile is encoded once and decodes all its boxes in one batch;
* a box that no tile holds (a merged box across a border wider than the overlap, or a large box of
  the whole-image pass) gets its own square window: its longer side times ``CONTEXT`` (at least a
  tile), centred on it and shifted inside the image (the whole image when it is smaller).

Each region's masks come back at the region's pixels and are placed in the image
(``Masks`` offsets); the result is in the boxes' order, as ``Segmenter.segment`` gives it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks
from gdino.inference.tiles import Tile, TileSettings, tile_grid
from gdino.processing.image import ImageLike, load_image

CONTEXT = 1.5  # a box without a tile: its window's side over the box's longer side


class BoxSegmenter(Protocol):
    """What is needed of a segmenter (``Segmenter``, ``OnnxSegmenter``)."""

    def segment(self, image: ImageLike, boxes: np.ndarray) -> tuple[Masks, np.ndarray]: ...


def segment_regions(
    segmenter: BoxSegmenter, image: ImageLike, boxes: np.ndarray, tiles: TileSettings | None
) -> tuple[Masks, np.ndarray]:
    """One mask per box (N, 4) x0 y0 x1 y1 in image pixels, and (N,) scores: on the whole image
    without ``tiles``, else on the crops around the boxes (module docstring)."""
    if tiles is None:
        return segmenter.segment(image, boxes)
    picture = load_image(image)
    size = (picture.width, picture.height)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    placed: list[tuple[np.ndarray, tuple[int, int]]] = [(np.zeros((0, 0), bool), (0, 0))] * len(boxes)
    scores = np.zeros(len(boxes), np.float32)
    for region, members in box_regions(boxes, tile_grid(*size, tiles), size, tiles.size):
        x0, y0 = region[0], region[1]
        shift = np.array([x0, y0, x0, y0], np.float32)
        masks, found = segmenter.segment(picture.crop(region), boxes[members] - shift)
        for j, crop, (cx, cy) in zip(members, masks.crops, masks.offsets):
            placed[j] = (crop, (int(cx) + x0, int(cy) + y0))
        scores[members] = found
    return Masks.from_crops(placed, size), scores


def add_region_masks(
    segmenter: BoxSegmenter, image: ImageLike, found: Detections, tiles: TileSettings | None
) -> Detections:
    """``found`` with a mask and mask score for each box (``segment_regions``)."""
    return found.with_masks(*segment_regions(segmenter, image, found.boxes, tiles))


def box_regions(
    boxes: np.ndarray, grid: Sequence[Tile], image_size: tuple[int, int], tile_size: int
) -> list[tuple[Tile, np.ndarray]]:
    """The regions to segment on, each with the indices of its boxes: tiles taken greedily, then
    one window per box that no tile holds (module docstring). Every box is in exactly one."""
    tiles = np.asarray(grid, np.float32).reshape(-1, 4)  # (T, 4)
    holds = (  # (N, T): tile t holds box n wholly
        (boxes[:, None, 0] >= tiles[None, :, 0])
        & (boxes[:, None, 1] >= tiles[None, :, 1])
        & (boxes[:, None, 2] <= tiles[None, :, 2])
        & (boxes[:, None, 3] <= tiles[None, :, 3])
    )
    free = np.ones(len(boxes), bool)
    regions: list[tuple[Tile, np.ndarray]] = []
    while True:
        counts = (holds & free[:, None]).sum(axis=0)  # (T,)
        if len(counts) == 0 or counts.max() == 0:
            break
        best = int(counts.argmax())  # the first of the tiles holding most
        members = np.flatnonzero(holds[:, best] & free)
        regions.append((grid[best], members))
        free[members] = False
    for n in np.flatnonzero(free):
        regions.append((box_window(boxes[n], image_size, tile_size), np.array([n])))
    return regions


def box_window(box: np.ndarray, image_size: tuple[int, int], tile_size: int) -> Tile:
    """A square of side max(tile, CONTEXT x the box's longer side) centred on the box, shifted inside
    the image (cut to it along a side shorter than the square)."""
    width, height = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(tile_size, math.ceil(CONTEXT * max(x1 - x0, y1 - y0)))
    left, right = _span((x0 + x1) / 2, side, width)
    top, bottom = _span((y0 + y1) / 2, side, height)
    return left, top, right, bottom


def _span(centre: float, side: int, length: int) -> tuple[int, int]:
    """[start, end) of ``side`` pixels centred on ``centre``, inside [0, length)."""
    if side >= length:
        return 0, length
    start = min(max(0, round(centre - side / 2)), length - side)
    return start, start + side
