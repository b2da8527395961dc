"""Point, label and box prompts for SAM and SAM 2.1: nested lists (or arrays) -> padded arrays in the model's input.

transformers' ``SamProcessor`` and ``Sam2Processor`` take prompts in pixels of the original image,
nested per image: points ``[image][object][point][x, y]``, labels ``[image][object][point]``,
boxes ``[image][box][x0, y0, x1, y1]``. Objects with fewer points are padded with
``POINT_PAD`` (-10), which the models read as "not a point" and which scaling leaves as it is.
Both processors scale x by ``new_w / old_w`` and y by ``new_h / old_h``; only the new size differs
(SAM 2.1: the square input; SAM: the longest side resized, the other rounded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

POINT_PAD = -10
"""What pads missing points (both coordinates) and their labels, as in transformers."""


def nested_array(data: Any, depth: int, name: str, last: int | None = None, pad: float | None = None) -> np.ndarray:
    """A prompt given as a nested list, numpy array or tensor -> one float64 array of ``depth`` dimensions.

    Args:
        data: the prompt, e.g. ``[[[x0, y0, x1, y1], ...]]`` for boxes.
        depth: how many levels it must have (points 4, labels 3, boxes 3).
        name: its name, for errors ("input_boxes").
        last: the size the innermost level must have (2 for points, 4 for boxes), or None.
        pad: the value that fills shorter lists up to the longest at each level; None: they must agree.

    Raises:
        ValueError: another depth, another innermost size, or ragged lists that may not be padded.
    """
    if hasattr(data, "detach"):  # a torch tensor, without importing torch here
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.ndim != depth:
            raise ValueError(f"{name} must have {depth} levels ({_FORMATS[name]}), got an array of shape {data.shape}")
        array = data.astype(np.float64)
    else:
        levels = _depth(data)
        if levels != depth:
            raise ValueError(f"{name} must be a nested list of {depth} levels ({_FORMATS[name]}), got {levels}")
        shape = _max_shape(data, depth)
        array = np.full(shape, np.nan if pad is None else pad, np.float64)
        _fill(array, data, ())
        if pad is None and np.isnan(array).any():
            raise ValueError(f"{name} has lists of different lengths, which cannot be padded: give each image as many")
    if last is not None and array.shape[-1] != last:
        raise ValueError(f"{name} must end in {last} numbers ({_FORMATS[name]}), got {array.shape[-1]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds a value that is not a finite number")
    return array


def scale_coordinates(
    coords: np.ndarray,
    original_sizes: Sequence[tuple[int, int]],
    new_sizes: Sequence[tuple[int, int]],
    keep_pad: bool,
    dtype: type[np.floating] = np.float64,
) -> np.ndarray:
    """Pixel coordinates of each image's original size -> its resized size.

    Args:
        coords: (B, ..., 2k) x y pairs per image (points (B, P, N, 2), boxes (B, P, 4)); B may be 1
            for several images, or more images than sizes take the first size, as transformers does.
        original_sizes, new_sizes: (height, width) of each image before and after resizing.
        keep_pad: leave points whose coordinates are both ``POINT_PAD`` as they are.
        dtype: the precision of the arithmetic: transformers' ``Sam2Processor`` scales float32
            tensors, its ``SamProcessor`` float64 arrays.

    Returns:
        Coordinates of the same shape, in ``dtype``.
    """
    out = coords.astype(dtype, copy=True)
    pairs = out.reshape(out.shape[0], -1, 2)  # (B, K, 2) a view of out
    padded = (pairs == POINT_PAD).all(axis=-1) if keep_pad else np.zeros(pairs.shape[:2], bool)  # (B, K)
    for i in range(out.shape[0]):
        j = i if i < len(original_sizes) else 0
        (old_h, old_w), (new_h, new_w) = original_sizes[j], new_sizes[j]
        scale = np.array([new_w / old_w, new_h / old_h], dtype)
        pairs[i] = np.where(padded[i][:, None], pairs[i], pairs[i] * scale)
    return out


def check_prompts(points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None) -> None:
    """Points and labels must agree in shape, and so must the number of objects with boxes.

    Raises:
        ValueError: naming the shapes that disagree.
    """
    if points is not None and labels is not None and points.shape[:3] != labels.shape:
        raise ValueError(
            f"input_points {points.shape[:3]} and input_labels {labels.shape} must have the same images, objects "
            "and points"
        )
    if points is not None and boxes is not None and points.shape[:2] != boxes.shape[:2]:
        raise ValueError(
            f"input_points give {points.shape[:2]} (images, objects) and input_boxes {boxes.shape[:2]}: one box per "
            "object"
        )


_FORMATS = {
    "input_points": "[image][object][point][x, y]",
    "input_labels": "[image][object][point]",
    "input_boxes": "[image][box][x0, y0, x1, y1]",
}


def _depth(data: Any) -> int:
    levels = 0
    while isinstance(data, (list, tuple)):
        levels += 1
        if not data:
            break
        data = data[0]
    if hasattr(data, "shape"):  # a list of arrays
        levels += len(data.shape)
    return levels


def _max_shape(data: Any, depth: int) -> tuple[int, ...]:
    shape = [0] * depth
    level: list[Any] = [data]
    for d in range(depth):
        shape[d] = max((len(x) for x in level), default=0)
        level = [y for x in level for y in x]
    return tuple(shape)


def _fill(array: np.ndarray, data: Any, index: tuple[int, ...]) -> None:
    if len(index) == array.ndim - 1:
        array[index][: len(data)] = np.asarray(data, np.float64)
        return
    for i, item in enumerate(data):
        _fill(array, item, (*index, i))
