"""One mask's logits resized to the image and thresholded, computed only where they can be positive.

``F.interpolate(logits, (H, W), mode="bilinear", align_corners=False) > 0`` for one mask needs an
(H, W) float array (48 MB for 4000 x 3000). A bilinear output pixel is a convex combination of its
2 x 2 source pixels, so it can be positive only where one of them is: ``resize_positive`` computes
the same interpolation (PyTorch's source-index rule, in float32) over the output rows and columns
that read the positive source pixels' bounding box, and returns that part's tight crop. It runs in
numpy, one mask at a time, so no thread pool is woken for each small mask.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gdino.inference.masks import crop_mask

_EMPTY = (np.zeros((0, 0), bool), (0, 0))


def check_boxes(boxes: Any) -> np.ndarray:
    """Box prompts as (N, 4) float64 x0 y0 x1 y1 ((0, 4) for no boxes), for ``Segmenter`` and the ONNX runtime's.

    Raises:
        ValueError: boxes that are not (N, 4) finite numbers.
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) x0 y0 x1 y1, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("boxes hold a value that is not a finite number")
    return array


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) x0 y0 x1 y1 clipped to an image of ``size`` (width, height)."""
    return np.clip(boxes, 0, [size[0], size[1], size[0], size[1]])


def resize_positive(logits: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(h, w) mask logits -> the crop of ``bilinear_resize(logits, size) > 0`` and its (x0, y0) offset.

    Args:
        logits: (h, w) float32 logits.
        size: the output (height, width).

    Returns:
        A bool crop (tight; (0, 0) when nothing is positive) and its offset in the output.
    """
    positive = logits > 0
    rows = np.flatnonzero(positive.any(axis=1))
    if rows.size == 0:
        return _EMPTY
    cols = np.flatnonzero(positive.any(axis=0))
    y_lo, (top, bottom, ly) = _source(logits.shape[0], size[0], int(rows[0]), int(rows[-1]))
    x_lo, (left, right, lx) = _source(logits.shape[1], size[1], int(cols[0]), int(cols[-1]))
    if top.size == 0 or left.size == 0:
        return _EMPTY
    one = np.float32(1)
    values = logits.astype(np.float32, copy=False)
    band = values[top] * (one - ly)[:, None] + values[bottom] * ly[:, None]  # (R, w)
    region = band[:, left] * (one - lx) + band[:, right] * lx  # (R, C)
    return crop_mask(region > 0, (x_lo, y_lo))


def _source(n_in: int, n_out: int, first: int, last: int) -> tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The first of the output indices whose two source pixels touch [first, last], with those
    outputs' source indices and the weight of the second, by PyTorch's rule for
    ``align_corners=False`` (in float32): src = max((dst + 0.5) * n_in / n_out - 0.5, 0),
    i0 = floor(src), i1 = min(i0 + 1, n_in - 1)."""
    half = np.float32(0.5)
    src = np.maximum((np.arange(n_out, dtype=np.float32) + half) * np.float32(n_in / n_out) - half, 0)  # (n_out,)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    index = np.flatnonzero(((i0 >= first) & (i0 <= last)) | ((i1 >= first) & (i1 <= last)))
    if index.size == 0:
        return 0, (index, index, np.zeros(0, np.float32))
    lo, hi = int(index[0]), int(index[-1]) + 1
    return lo, (i0[lo:hi], i1[lo:hi], src[lo:hi] - i0[lo:hi].astype(np.float32))
