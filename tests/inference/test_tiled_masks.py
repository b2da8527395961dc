"""Masks of tiled detections (``gdino.inference.tiled_masks``): each box segmented on the tile that
holds it (tiles taken greedily, each encoded once), a box no tile holds on a window around it, and
the masks placed back at the image's pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks
from gdino.inference.tiled_masks import box_regions, box_window, segment_regions
from gdino.inference.tiles import TileSettings, tile_grid

SETTINGS = TileSettings(100, 0.2)  # on 300x200: tiles step 80 px, x at 0, 80, 160, 200 and y at 0, 80, 100


class BoxFill:
    """A segmenter whose mask of a box is the box itself (rounded), scored 0.5; it records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, int], np.ndarray]] = []

    def segment(self, image: Image.Image, boxes: np.ndarray) -> tuple[Masks, np.ndarray]:
        self.calls.append((image.size, boxes.copy()))
        crops = []
        for x0, y0, x1, y1 in np.round(boxes).astype(int):
            x0, y0 = max(x0, 0), max(y0, 0)
            x1, y1 = min(x1, image.width), min(y1, image.height)
            crops.append((np.ones((y1 - y0, x1 - x0), bool), (x0, y0)))
        return Masks.from_crops(crops, image.size), np.full(len(boxes), 0.5, np.float32)


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))


def test_boxes_are_segmented_on_the_tiles_that_hold_them() -> None:
    boxes = np.array(
        [
            [10, 10, 30, 30],  # in tile (0, 0) only
            [85, 10, 95, 20],  # in tiles (0, 0) and (80, 0): goes with the first, which holds more
            [170, 120, 190, 150],  # in (160, 100) and (100..., ...) tiles: a lower tile
            [40, 60, 140, 110],  # wider than any tile's hold: a window of its own
            [0, 0, 300, 200],  # the whole image (a full-image pass's box)
        ],
        np.float32,
    )
    grid = tile_grid(300, 200, SETTINGS)
    regions = box_regions(boxes, grid, (300, 200), SETTINGS.size)
    placed = sorted(int(i) for _, members in regions for i in members)
    assert placed == [0, 1, 2, 3, 4]  # each box once
    assert regions[0] == ((0, 0, 100, 100), pytest.approx([0, 1]))
    assert regions[1][0] in grid and 2 in regions[1][1].tolist()
    assert regions[2] == (box_window(boxes[3], (300, 200), 100), pytest.approx([3]))
    assert regions[2][0] == (15, 10, 165, 160)  # 1.5 x its 100 px side, centred on it
    assert regions[3][0] == (0, 0, 300, 200)  # over the image on both sides: the image

    fill = BoxFill()
    masks, scores = segment_regions(fill, picture(), boxes, SETTINGS)
    assert [size for size, _ in fill.calls] == [(100, 100), (100, 100), (150, 150), (300, 200)]
    np.testing.assert_array_equal(fill.calls[0][1], boxes[:2])  # tile (0, 0): boxes unshifted
    np.testing.assert_array_equal(fill.calls[2][1], boxes[3:4] - [15, 10, 15, 10])  # in the window's pixels
    assert masks.image_size == (300, 200) and len(masks) == 5
    dense = masks.dense()
    for box, mask in zip(boxes.astype(int), dense):  # each mask back at its box in the image
        expected = np.zeros((200, 300), bool)
        expected[box[1] : box[3], box[0] : box[2]] = True
        np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(scores, np.full(5, 0.5, np.float32))


def test_without_tiles_the_whole_image_and_no_boxes() -> None:
    fill = BoxFill()
    boxes = np.array([[10, 10, 30, 30]], np.float32)
    segment_regions(fill, picture(), boxes, None)
    assert [size for size, _ in fill.calls] == [(300, 200)]
    masks, scores = segment_regions(fill, picture(), np.zeros((0, 4), np.float32), SETTINGS)
    assert len(masks) == 0 and masks.image_size == (300, 200) and scores.shape == (0,)


def test_a_window_is_shifted_inside_the_image() -> None:
    assert box_window(np.array([280, 190, 299, 199]), (300, 200), 100) == (200, 100, 300, 200)
    assert box_window(np.array([0, 0, 10, 10]), (300, 200), 100) == (0, 0, 100, 100)
    assert box_window(np.array([0, 0, 250, 20]), (300, 200), 100) == (0, 0, 300, 200)  # 375 px: the image


def test_detect_with_tiles_and_a_segmenter(fast_model) -> None:
    """The detector hands its merged boxes to the tiles' crops: a mask per detection, at image pixels."""
    image = picture()
    found = fast_model.detect(image, "a cat. a remote control.", 0.2, tiles=SETTINGS, segmenter=BoxFill())
    assert isinstance(found, Detections) and len(found) > 0
    assert found.masks is not None and len(found.masks) == len(found)
    for box, mask in zip(found.boxes, found.masks.dense()):
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], box, atol=1.0)
