"""The masks of ``gdino label --masks`` in each export format, from the COCO RLE its journal keeps.

A detection of a record may carry ``"mask"`` (COCO compressed RLE of the whole image, as
``Detections.to_list`` writes it) and ``"mask_score"``. From it:

* COCO: ``segmentation`` as polygons (``Masks.polygons``: outer contours, OpenCV) or as the RLE
  itself (``mask_format="rle"``); ``area`` is the mask's pixel count. A mask with no polygon (empty,
  or only specks under a pixel) keeps its RLE, since pycocotools cannot read an empty polygon list.
* YOLO: one polygon per object (``class x1 y1 x2 y2 ...``, normalised), as ``yolo segment train``
  reads it. A mask in several parts is joined into one polygon by zero-width seams between the
  parts' nearest points, as Ultralytics' own COCO converter (``merge_multi_segment``) does, so no
  part of an object is lost (keeping only the largest part would drop e.g. the far side of an
  occluded object); a mask without a polygon gets no line.
* Pascal VOC: ``SegmentationObject/<path>.png`` (pixel = the object's place in the XML, 1..) and
  ``SegmentationClass/<path>.png`` (pixel = class index + 1), 0 background, palette PNGs with VOC's
  colour map as VOC ships them. VOC's 255 (a hand-drawn "void" band round each object) is not
  written: the masks have no uncertain rim. Where masks overlap the better-scored object wins.

pycocotools and OpenCV (``gdino[masks]``) are imported only when a record has masks.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from gdino.inference.masks import Masks, crop_mask

MASK_FORMATS = ("polygon", "rle")
VOC_VOID = 255  # VOC's "void" index; also the most objects (254) a SegmentationObject PNG holds + 1


def has_masks(records: Sequence[dict[str, Any]]) -> bool:
    """Whether any detection of ``records`` carries a mask."""
    return any("mask" in det for record in records for det in record["detections"])


def decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO compressed RLE ``{"size": [h, w], "counts": str}`` -> (h, w) bool."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def mask_area(rle: dict[str, Any]) -> int:
    """Pixels in the mask (pycocotools' ``area``)."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return int(mask_utils.area({"size": list(rle["size"]), "counts": counts}))


def polygons(rle: dict[str, Any]) -> list[list[float]]:
    """The mask's outer contours in image pixels, COCO style (``Masks.polygons``); [] if none."""
    height, width = (int(v) for v in rle["size"])
    masks = Masks.from_crops([crop_mask(decode(rle), (0, 0))], (width, height))
    return masks.polygons(0)


# --------------------------------------------------------------------------- COCO


def coco_segmentation(rle: dict[str, Any], mask_format: str) -> dict[str, Any]:
    """``{"segmentation": ..., "area": ...}`` of one annotation: polygons or RLE, area from the mask."""
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"unknown mask format {mask_format!r}; choose from {', '.join(MASK_FORMATS)}")
    parts = polygons(rle) if mask_format == "polygon" else []
    segmentation: Any = parts if parts else {"size": list(rle["size"]), "counts": rle["counts"]}
    return {"segmentation": segmentation, "area": mask_area(rle)}


# --------------------------------------------------------------------------- YOLO


def join_parts(parts: Sequence[Sequence[float]]) -> list[float]:
    """Several polygons ``[x0, y0, x1, y1, ...]`` as one: each part is entered at its point nearest
    the previous part, walked round, and left the way it was entered (a zero-width seam), so the
    outline covers every part. One part comes back unchanged."""
    rings = [np.asarray(p, np.float64).reshape(-1, 2) for p in parts]  # (K_i, 2) x y
    if len(rings) == 1:
        return [float(v) for v in rings[0].reshape(-1)]
    links = [_nearest(a, b) for a, b in pairwise(rings)]  # (exit of part i, entry of part i + 1)
    entries = [links[0][0]] + [entry for _, entry in links]
    path = _loop(rings[-1], entries[-1])
    for i in range(len(rings) - 2, -1, -1):  # each part wraps the walk of the parts after it
        loop = _loop(rings[i], entries[i])
        step = (links[i][0] - entries[i]) % len(rings[i])
        path = loop[: step + 1] + path + loop[step:]
    return [float(v) for v in np.stack(path).reshape(-1)]


def _loop(ring: np.ndarray, entry: int) -> list[np.ndarray]:
    """The points of ``ring`` (K, 2) from ``entry`` round and back to it (K + 1 points)."""
    return [ring[(entry + k) % len(ring)] for k in range(len(ring) + 1)]


def _nearest(a: np.ndarray, b: np.ndarray, rows: int = 256) -> tuple[int, int]:
    """Indices of the closest pair of points, one of ``a`` (K, 2) and one of ``b`` (L, 2); ``rows`` of
    ``a`` at a time, so long contours need (rows, L) numbers, not (K, L)."""
    best, pair = np.inf, (0, 0)
    for start in range(0, len(a), rows):
        distances = ((a[start : start + rows, None, :] - b[None, :, :]) ** 2).sum(-1)  # (rows, L)
        i, j = np.unravel_index(int(distances.argmin()), distances.shape)
        if distances[i, j] < best:
            best, pair = float(distances[i, j]), (start + int(i), int(j))
    return pair


def yolo_segment_line(label_id: int, rle: dict[str, Any], width: int, height: int) -> str | None:
    """``class x1 y1 x2 y2 ...`` normalised to the image, 6 decimals; None for a mask with no polygon."""
    parts = polygons(rle)
    if not parts:
        return None
    points = np.asarray(join_parts(parts)).reshape(-1, 2) / (width, height)  # (K, 2) in 0..1
    coords = " ".join(f"{v:.6f}" for v in np.clip(points, 0.0, 1.0).reshape(-1))
    return f"{label_id} {coords}\n"


# --------------------------------------------------------------------------- Pascal VOC


def voc_palette() -> list[int]:
    """VOC's 256-colour map (index 1 dark red, 255 cream), flat r g b, as its PNGs carry it."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_pngs(objects: Sequence[tuple[int, dict[str, Any]]], width: int, height: int) -> tuple[bytes, bytes, list[str]]:
    """The SegmentationObject and SegmentationClass PNGs of one image.

    Args:
        objects: (label_id, detection) of each object in the XML's order (best first); a detection
            without ``"mask"`` paints nothing.
        width, height: the image's size.

    Returns:
        The two PNG files' bytes and a message for each object that cannot be painted (an object
        past the 254th, or a class past the 254th).
    """
    instances = np.zeros((height, width), np.uint8)  # (H, W) object index, 0 background
    classes = np.zeros((height, width), np.uint8)  # (H, W) class index + 1
    problems = []
    for place in range(len(objects), 0, -1):  # the last first, so the best-scored object ends on top
        label_id, det = objects[place - 1]
        if "mask" not in det:
            continue
        if place >= VOC_VOID or label_id + 1 >= VOC_VOID:
            problems.append(f"object {place} (class {label_id}) is past what a VOC PNG's 254 indices hold")
            continue
        mask = decode(det["mask"])
        if mask.shape != (height, width):
            problems.append(f"object {place}'s mask is {mask.shape[1]}x{mask.shape[0]}, not {width}x{height}")
            continue
        instances[mask] = place
        classes[mask] = label_id + 1
    return _palette_png(instances), _palette_png(classes), problems


def _palette_png(index: np.ndarray) -> bytes:
    from PIL import Image

    image = Image.fromarray(index, mode="P")
    image.putpalette(voc_palette())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
