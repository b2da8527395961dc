"""``OnnxSegmenter``: the segmenter graphs of an export (``gdino export onnx --masks MODEL``), without torch.

The same ``segment(image, boxes)`` and ``add_masks(image, found)`` as
``gdino.inference.segmenter.Segmenter``, from the same code: the image prepared by
``gdino.processing.sam_image.image_pixels``, boxes checked, clipped and scaled to the model's input
as there (``gdino.inference.mask_resize``, ``gdino.processing.sam_prompts``), the image graph run
once, the boxes decoded ``batch_size`` at a time, and each mask's logits resized to the image and
thresholded alone (``resize_positive``), kept as crops (``Masks``). ``gdino.runtime.onnx.load`` of an
export with segmenter graphs gives one as its ``segmenter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gdino.inference.detections import Detections
from gdino.inference.mask_resize import check_boxes, clip_boxes, resize_positive
from gdino.inference.masks import Masks
from gdino.processing.image import ImageLike, load_image
from gdino.processing.sam_image import SamImageSettings, image_pixels
from gdino.processing.sam_prompts import scale_coordinates
from gdino.utils.hub import CheckpointError

SEGMENTER_GRAPHS = ("image", "decoder")
_COORDINATE_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float64": np.float64}


class OnnxSegmenter:
    """A mask per box from the export's ``segmenter_image.onnx`` and ``segmenter_decoder.onnx``."""

    def __init__(self, sessions: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
        """
        Args:
            sessions: an onnxruntime (or OpenVINO) session for the ``"image"`` and ``"decoder"`` graphs.
            settings: ``gdino_onnx.json``'s ``"segmenter"`` (``read_segmenter_settings``).
            path: that file, for messages.
        """
        self.sessions = sessions
        self.family = str(settings["family"])
        self.settings = _image_settings(path, settings["image"])
        self.coordinate_dtype = _COORDINATE_DTYPES[str(settings.get("coordinate_dtype", "float32"))]
        self.mask_threshold = float(settings.get("mask_threshold", 0.0))
        self.batch_size = int(settings.get("batch_size", 32))

    def segment(self, image: ImageLike, boxes: np.ndarray) -> tuple[Masks, np.ndarray]:
        """One mask per box, at the image's original size (as ``Segmenter.segment``).

        Args:
            image: a PIL image, a uint8 array (H, W, 3) or a path.
            boxes: (N, 4) x0 y0 x1 y1 in pixels of the image; clipped to the image first.

        Returns:
            N masks (``Masks``, cropped to their bounds) and (N,) float32 scores (predicted IoU).
        """
        boxes = check_boxes(boxes)
        picture = load_image(image)
        size = (picture.width, picture.height)
        if len(boxes) == 0:
            return Masks.empty(size), np.zeros(0, np.float32)
        pixels, resized = image_pixels(picture, self.settings)  # (3, S, S)
        encoded = self._encode(pixels[None])
        original = (picture.height, picture.width)
        scaled = scale_coordinates(clip_boxes(boxes, size)[None], [original], [resized], False, self.coordinate_dtype)
        crops: list[tuple[np.ndarray, tuple[int, int]]] = []
        scores = []
        for start in range(0, len(boxes), self.batch_size):
            prompts = scaled[:, start : start + self.batch_size].astype(np.float32)  # (1, P, 4)
            masks, iou = self.sessions["decoder"].run(["masks", "scores"], {**encoded, "boxes": prompts})
            scores.append(np.asarray(iou, np.float32))
            crops += [self._mask(logits[0], resized, original) for logits in masks]  # (1, h, w) each
        return Masks.from_crops(crops, size), np.concatenate(scores)

    def add_masks(self, image: ImageLike, found: Detections) -> Detections:
        """``found`` with a mask and mask score for each of its boxes."""
        return found.with_masks(*self.segment(image, found.boxes))

    def _encode(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(1, 3, S, S) pixels -> the image graph's outputs, by name (the decoder's inputs)."""
        session = self.sessions["image"]
        return dict(zip((o.name for o in session.get_outputs()), session.run(None, {"pixel_values": pixels})))

    def _mask(
        self, logits: np.ndarray, resized: tuple[int, int], original: tuple[int, int]
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """One mask's (h, w) logits -> its crop at the original size. SAM's come in the padded square's
        frame: cropped to the resized image first (``low_res_frame``)."""
        frame = logits if self.settings.square else logits[: resized[0], : resized[1]]  # (h', w')
        if self.mask_threshold:
            frame = frame - np.float32(self.mask_threshold)  # a bilinear resize commutes with the shift
        return resize_positive(frame, original)


def read_segmenter_settings(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """``gdino_onnx.json``'s ``"segmenter"``, checked; None when the export has none.

    Raises:
        CheckpointError: the entry lacks a field or holds one of another type (named).
    """
    entry = settings.get("segmenter")
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: 'segmenter' must be an object, got {entry!r}")
    graphs = entry.get("graphs")
    if not isinstance(graphs, dict) or any(not isinstance(graphs.get(g), str) for g in SEGMENTER_GRAPHS):
        raise CheckpointError(f"{path}: 'segmenter' must name its image and decoder graphs in 'graphs'")
    if entry.get("family") not in ("sam2", "sam") or not isinstance(entry.get("image"), dict):
        raise CheckpointError(f"{path}: 'segmenter' needs 'family' (sam2 or sam) and 'image' (its image settings)")
    if str(entry.get("coordinate_dtype", "float32")) not in _COORDINATE_DTYPES:
        raise CheckpointError(f"{path}: 'segmenter': 'coordinate_dtype' must be float32 or float64")
    return entry


def _image_settings(path: Path, values: dict[str, Any]) -> SamImageSettings:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return SamImageSettings(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: 'segmenter' 'image' holds settings the runtime cannot use: {e}") from None
