"""Seeded training augmentation that keeps boxes right: flip, multi-scale resize, random crop.

The recipe of DETR / Open-GroundingDino's training transforms: a horizontal flip (p = 0.5), then
with p = 0.5 either a resize to a random short side (480..800 in steps of 32, long side at most
1333), or a resize to a random short side of 400/500/600, a random crop of 384..600 pixels a side
and the multi-scale resize. ``AugmentSettings.scaled`` shrinks every size for small models.

Boxes are ``x0, y0, x1, y1`` pixels (edges: a box over pixel columns 3..9 is x0 = 3, x1 = 10).
A crop clips boxes to it and drops the ones left under ``min_box_size`` pixels wide or high;
the returned ``keep`` says which input boxes remain, so their labels follow. Randomness comes
only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from gdino.processing.image import resized_size


@dataclass(frozen=True)
class AugmentSettings:
    """Sizes and probabilities of :class:`Augment`; defaults are the original training's."""

    scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int | None = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_min: int = 384
    crop_max: int = 600
    min_box_size: float = 1.0

    @classmethod
    def scaled(cls, factor: float, **overrides: object) -> AugmentSettings:
        """Every size times ``factor`` (as Open-GroundingDino's ``data_aug_scale_overlap``):
        ``scaled(0.4)`` has short sides 192..320 and a long side of at most 533."""
        base = cls()
        sizes = {
            "scales": tuple(sorted({int(s * factor) for s in base.scales})),
            "max_size": None if base.max_size is None else int(base.max_size * factor),
            "crop_scales": tuple(int(s * factor) for s in base.crop_scales),
            "crop_min": int(base.crop_min * factor),
            "crop_max": int(base.crop_max * factor),
        }
        return cls(**{**sizes, **overrides})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- single transforms


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirrors the image left-right; ``x0, x1`` become ``W - x1, W - x0``."""
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def resize(image: np.ndarray, boxes: np.ndarray, short: int, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Short side to ``short`` (long side at most ``max_size``), by the processor's size rule."""
    height, width = image.shape[:2]
    new_h, new_w = resized_size(height, width, short, max_size)
    if (new_h, new_w) == (height, width):
        return image, boxes
    out = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    scale = np.array([new_w / width, new_h / height, new_w / width, new_h / height], dtype=np.float32)
    return np.asarray(out), boxes * scale


def crop(
    image: np.ndarray, boxes: np.ndarray, top: int, left: int, height: int, width: int, min_box_size: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``height x width`` region at ``(top, left)``; boxes clipped to it.

    Returns:
        ``(image, boxes, keep)``: the boxes at least ``min_box_size`` wide and high after
        clipping, and their indices in the input.
    """
    out = image[top : top + height, left : left + width]
    moved = boxes - np.array([left, top, left, top], dtype=np.float32)
    moved[:, 0::2] = moved[:, 0::2].clip(0, out.shape[1])
    moved[:, 1::2] = moved[:, 1::2].clip(0, out.shape[0])
    keep = np.flatnonzero((moved[:, 2] - moved[:, 0] >= min_box_size) & (moved[:, 3] - moved[:, 1] >= min_box_size))
    return np.ascontiguousarray(out), moved[keep], keep


# --------------------------------------------------------------------------- the recipe


class Augment:
    """The training augmentation; ``augment(image, boxes, rng) -> (image, boxes, keep)``.

    Args:
        settings: sizes and probabilities.
    """

    def __init__(self, settings: AugmentSettings | None = None) -> None:
        self.settings = settings if settings is not None else AugmentSettings()

    def __call__(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Augments a ``(H, W, 3)`` uint8 image and its ``(N, 4)`` xyxy pixel boxes.

        Returns:
            The new image, its boxes, and ``keep``: the input index of each returned box.
        """
        s = self.settings
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        keep = np.arange(len(boxes))
        if rng.random() < s.flip_prob:
            image, boxes = hflip(image, boxes)
        if rng.random() < s.crop_prob:
            image, boxes = resize(image, boxes, int(rng.choice(s.crop_scales)), None)
            image, boxes, kept = self._random_crop(image, boxes, rng)
            keep = keep[kept]
        image, boxes = resize(image, boxes, int(rng.choice(s.scales)), s.max_size)
        return image, boxes, keep

    def _random_crop(
        self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A crop of random size (``crop_min``..``crop_max`` a side, at most the image) and place."""
        s = self.settings
        height, width = image.shape[:2]
        h = int(rng.integers(min(s.crop_min, height), min(s.crop_max, height) + 1))
        w = int(rng.integers(min(s.crop_min, width), min(s.crop_max, width) + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        return crop(image, boxes, top, left, h, w, s.min_box_size)
