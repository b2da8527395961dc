"""Augmentation keeps boxes on their pixels: coloured rectangles are drawn, augmented and found again."""

from __future__ import annotations

import numpy as np

from gdino.training.augment import Augment, AugmentSettings, crop, hflip, resize

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A 120x200 grey image with a red, a green and a blue rectangle; boxes are their pixel edges."""
    image = np.full((120, 200, 3), 128, dtype=np.uint8)
    boxes = np.array([[10, 15, 70, 60], [90, 40, 150, 110], [160, 5, 195, 45]], dtype=np.float32)
    for (x0, y0, x1, y1), colour in zip(boxes.astype(int), COLOURS):
        image[y0:y1, x0:x1] = colour
    return image, boxes


def _bounds(image: np.ndarray, colour: np.ndarray) -> np.ndarray | None:
    """Pixel-edge bounds of the pixels at least half-way to ``colour`` from grey."""
    channel = int(np.argmax(colour))
    ys, xs = np.nonzero(image[..., channel].astype(int) - image[..., (channel + 1) % 3].astype(int) > 64)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_flip_is_exact():
    image, boxes = _scene()
    out, flipped = hflip(image, boxes)
    np.testing.assert_array_equal(flipped[0], [130, 15, 190, 60])
    for box, colour in zip(flipped, COLOURS):
        np.testing.assert_array_equal(_bounds(out, colour), box)


def test_resize_scales_boxes_with_the_pixels():
    image, boxes = _scene()
    out, scaled = resize(image, boxes, 300, 1333)
    assert out.shape[:2] == (300, 500)
    np.testing.assert_allclose(scaled[0], np.array([10, 15, 70, 60]) * 2.5)
    for box, colour in zip(scaled, COLOURS):
        np.testing.assert_allclose(_bounds(out, colour), box, atol=1.0)
    out, scaled = resize(image, boxes, 300, 400)  # long side capped
    assert out.shape[:2] == (240, 400)
    for box, colour in zip(scaled, COLOURS):
        np.testing.assert_allclose(_bounds(out, colour), box, atol=1.0)


def test_crop_clips_boxes_and_drops_those_that_vanish_with_their_index():
    image, boxes = _scene()
    out, cropped, keep = crop(image, boxes, top=30, left=50, height=70, width=100)
    assert out.shape[:2] == (70, 100)
    np.testing.assert_array_equal(keep, [0, 1])  # the blue one is outside the crop
    np.testing.assert_array_equal(cropped, [[0, 0, 20, 30], [40, 10, 100, 70]])
    for box, colour in zip(cropped, COLOURS[keep]):
        np.testing.assert_array_equal(_bounds(out, colour), box)
    assert _bounds(out, COLOURS[2]) is None
    # a sliver under min_box_size is dropped too
    _, _, keep = crop(image, boxes, top=0, left=69, height=120, width=131, min_box_size=1.5)
    np.testing.assert_array_equal(keep, [1, 2])


def test_the_recipe_keeps_every_box_on_its_colour_and_is_seeded():
    image, boxes = _scene()
    augment = Augment(AugmentSettings.scaled(0.4))  # short sides 192..320, crops 153..240
    assert augment.settings.scales[0] == 192 and augment.settings.scales[-1] == 320
    shapes, flips, drops = set(), 0, 0
    for seed in range(40):
        out, moved, keep = augment(image, boxes, np.random.default_rng(seed))
        assert min(out.shape[:2]) in augment.settings.scales and max(out.shape[:2]) <= 533
        shapes.add(out.shape)
        drops += len(keep) < 3
        for box, colour in zip(moved, COLOURS[keep]):
            found = _bounds(out, colour)
            assert found is not None, (seed, keep)
            np.testing.assert_allclose(found, box, atol=1.5, err_msg=f"seed {seed}")
        first = _bounds(out, COLOURS[0])
        flips += first is not None and 0 in keep and first[0] > out.shape[1] / 2
        again = augment(image, boxes, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], out)
        np.testing.assert_array_equal(again[1], moved)
    assert len(shapes) > 5 and flips > 5 and drops > 0
