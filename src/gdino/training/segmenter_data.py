"""Box-prompt batches for training a SAM 2 segmenter on generated shapes, and its input arithmetic.

The image goes in as SAM 2's processor (and ``gdino.inference.segmenter.Segmenter``) prepares it
(``preprocess``, ``gdino.processing.sam_image``): resized, not padded, to the model's square input
with bilinear resampling, scaled by 1/255 and normalised with ImageNet's mean and standard deviation.
Box prompts are the ground-truth boxes with SAM's training noise (each coordinate moved by a normal
of a tenth of the box's side, at most 20 pixels), scaled into the square input; targets are the
objects' visible pixels at the square input's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from gdino.processing.sam_image import SamImageSettings, image_pixels
from gdino.training.shapes import SPLITS, Scene, ShapesSettings, _split_pairs, pair_names, render


def preprocess(image: np.ndarray, size: int) -> Tensor:
    """(H, W, 3) uint8 RGB -> (3, size, size) float32 normalised pixels, exactly as ``Segmenter`` prepares them."""
    settings = SamImageSettings(square=True, size=size, pad_size=size)
    pixels, _ = image_pixels(Image.fromarray(image), settings)  # (3, S, S)
    return torch.from_numpy(pixels)


def to_input_boxes(boxes: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """(N, 4) x0 y0 x1 y1 in image pixels -> the same boxes in pixels of the square input."""
    scale = np.array([size / width, size / height, size / width, size / height], np.float32)
    return boxes.astype(np.float32) * scale


def jitter_boxes(
    boxes: np.ndarray, rng: np.random.Generator, width: int, height: int, noise: float, max_noise: float
) -> np.ndarray:
    """SAM's box-prompt noise: each coordinate of (N, 4) pixel boxes moved by N(0, noise * side),
    clipped to ``max_noise`` pixels, kept inside the image and at least a pixel wide."""
    sides = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)  # (N, 4): w h w h
    moved = boxes + np.clip(rng.normal(0.0, 1.0, boxes.shape) * noise * sides, -max_noise, max_noise)
    moved = np.clip(moved, 0, [width, height, width, height])
    moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1)
    return moved.astype(np.float32)


@dataclass(frozen=True)
class PromptBatch:
    """B images with up to P box prompts each (short images padded with weight-0 copies).

    Attributes:
        pixels: (B, 3, S, S) normalised input.
        boxes: (B, P, 4) x0 y0 x1 y1 in pixels of the square input.
        targets: (B, P, T, T) float, the fraction of each target pixel (the square input at T on a
            side) the object covers.
        weights: (B, P) 1 for a real prompt, 0 for padding.
        others: (B, P, T, T) float, the coverage of the image's other objects (hard negatives).
    """

    pixels: Tensor
    boxes: Tensor
    targets: Tensor
    weights: Tensor
    others: Tensor


def scene_targets(scene: Scene, size: int) -> Tensor:
    """The scene's (N, H, W) masks -> (N, size, size) float coverage of each square-input pixel."""
    masks = torch.from_numpy(scene.masks.astype(np.float32))[:, None]  # (N, 1, H, W)
    if masks.shape[0] == 0:
        return torch.zeros(0, size, size)
    return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]


def make_batch(
    scenes: Sequence[Scene],
    size: int,
    rng: np.random.Generator | None,
    noise: float = 0.1,
    max_noise: float = 20.0,
    target_size: int | None = None,
) -> PromptBatch:
    """The prompts of ``scenes`` (each with at least one object) for a ``size`` square input; boxes
    jittered unless ``rng`` is None; targets ``target_size`` on a side (default ``size``)."""
    p = max(len(s.pairs) for s in scenes)
    pixels, boxes, targets, weights, others = [], [], [], [], []
    for scene in scenes:
        height, width = scene.image.shape[:2]
        n = len(scene.pairs)
        given = scene.boxes if rng is None else jitter_boxes(scene.boxes, rng, width, height, noise, max_noise)
        order = np.arange(p) % n  # padding repeats the first prompts
        pixels.append(preprocess(scene.image, size))
        boxes.append(torch.from_numpy(to_input_boxes(given, width, height, size)[order]))
        cover = scene_targets(scene, target_size or size)  # (n, T, T)
        targets.append(cover[torch.from_numpy(order)])
        others.append((cover.sum(0, keepdim=True) - cover).clamp(0, 1)[torch.from_numpy(order)])
        weights.append((torch.arange(p) < n).float())
    stacked = (torch.stack(t) for t in (pixels, boxes, targets, weights, others))
    return PromptBatch(*stacked)


def split_scenes(
    split: str, start: int, count: int, seed: int, settings: ShapesSettings, photos: Sequence[np.ndarray]
) -> list[Scene]:
    """Scenes ``start .. start + count`` of a shapes split exactly as ``write_split`` renders them
    (before JPEG), those with no object left out."""
    names = pair_names()
    held = [names.index(p) for p in settings.held_out]
    pairs, first, _ = _split_pairs(split, held, len(names))
    scenes = [
        render(np.random.default_rng([seed, SPLITS[split], i]), pairs, settings, photos, first)
        for i in range(start, start + count)
    ]
    return [s for s in scenes if len(s.pairs)]
