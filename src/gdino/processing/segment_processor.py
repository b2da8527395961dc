"""``SegmentProcessor``: what ``Sam2Processor`` and ``SamProcessor`` share (images, prompts, masks back).

``processor(images=..., input_boxes=..., input_points=..., input_labels=..., return_tensors="pt")``
gives transformers' keys: ``pixel_values`` (B, 3, S, S) float32, ``original_sizes`` (B, 2) int64
(height, width), SAM's ``reshaped_input_sizes`` (B, 2), and the prompts scaled to the model's input:
``input_points`` (B, P, N, 2), ``input_labels`` (B, P, N) int64, ``input_boxes`` (B, P, 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from gdino.processing.image import ImageLike, images_to_list, load_image
from gdino.processing.processor import BatchEncoding
from gdino.processing.sam_image import SamImageSettings, image_pixels, masks_to_image, read_settings
from gdino.processing.sam_prompts import POINT_PAD, check_prompts, nested_array, scale_coordinates

_HUB_KWARGS = frozenset({"revision", "cache_dir", "token", "local_files_only", "force_download"})


class SegmentProcessor:
    """Images and prompts -> model inputs; mask logits -> masks at the original size."""

    square: ClassVar[bool] = True
    coordinate_dtype: ClassVar[type[np.floating]] = np.float32  # transformers' SamProcessor gives float64
    model_input_names: ClassVar[tuple[str, ...]] = ("pixel_values", "original_sizes")

    def __init__(self, settings: SamImageSettings | None = None) -> None:
        self.settings = settings if settings is not None else SamImageSettings(square=self.square)
        if self.settings.square != self.square:
            raise ValueError(f"{type(self).__name__} needs settings with square={self.square}")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str], **kwargs: Any) -> SegmentProcessor:
        """The processor of a hub id, a model directory or a checkpoint file: its
        ``preprocessor_config.json`` when present, else the published models' settings.

        Raises:
            TypeError: an argument other than the hub options (``revision``, ``cache_dir``, ...).
            ValueError: a preprocessor_config.json this implementation does not follow.
        """
        unknown = set(kwargs) - _HUB_KWARGS
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(unknown)}")
        return cls(read_settings(path_or_id, cls.square, **kwargs))

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images -> pixel values (B, 3, S, S) float32, original (B, 2) and resized (B, 2) (height, width) int64."""
        pixels, originals, resized = [], [], []
        for image in images_to_list(images):
            picture = load_image(image)
            values, size = image_pixels(picture, self.settings)
            pixels.append(values)
            originals.append((picture.height, picture.width))
            resized.append(size)
        return np.stack(pixels), np.array(originals, np.int64), np.array(resized, np.int64)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        input_points: Any = None,
        input_labels: Any = None,
        input_boxes: Any = None,
        original_sizes: Any = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchEncoding:
        """transformers' processor call; prompts are in pixels of the original images.

        Args:
            images: one image or a list (PIL, uint8 array or path); or none, with ``original_sizes``
                (B, 2) to scale prompts alone.
            input_points: ``[image][object][point][x, y]``; objects with fewer points are padded with -10.
            input_labels: ``[image][object][point]``: 1 foreground, 0 background.
            input_boxes: ``[image][box][x0, y0, x1, y1]``, as many boxes for each image.
            return_tensors: "pt" (the only one supported, as for the models).

        Raises:
            ValueError: prompts of the wrong depth or shape, neither images nor original_sizes.
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        encoding = BatchEncoding()
        if images is not None:
            pixels, originals, resized = self.preprocess(images)
            encoding["pixel_values"] = torch.from_numpy(pixels)
            encoding.update(self._sizes(originals, resized))
        elif original_sizes is not None:
            originals = np.asarray(torch.as_tensor(original_sizes).cpu(), np.int64).reshape(-1, 2)
            resized = np.array([self.settings.resized_size(int(h), int(w)) for h, w in originals], np.int64)
            encoding["original_sizes"] = torch.from_numpy(originals)
        else:
            raise ValueError("give images, or original_sizes to scale prompts alone")
        encoding.update(self.prompts(input_points, input_labels, input_boxes, originals, resized))
        return encoding

    def prompts(
        self, points: Any, labels: Any, boxes: Any, originals: np.ndarray, resized: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The prompts' tensors, scaled from the original images' pixels to the resized images'."""
        pts = None if points is None else nested_array(points, 4, "input_points", 2, POINT_PAD)
        lab = None if labels is None else nested_array(labels, 3, "input_labels", None, POINT_PAD)
        box = None if boxes is None else nested_array(boxes, 3, "input_boxes", 4)
        check_prompts(pts, lab, box)
        old = [(int(h), int(w)) for h, w in originals]
        new = [(int(h), int(w)) for h, w in resized]
        dtype = self.coordinate_dtype
        out = {}
        if pts is not None:
            out["input_points"] = torch.from_numpy(scale_coordinates(pts, old, new, True, dtype))
        if lab is not None:
            out["input_labels"] = torch.from_numpy(lab.astype(np.int64))
        if box is not None:
            out["input_boxes"] = torch.from_numpy(scale_coordinates(box, old, new, False, dtype))
        return out

    def scale_boxes(self, boxes: np.ndarray, original: tuple[int, int]) -> np.ndarray:
        """(N, 4) boxes in pixels of an image of the original (height, width) -> pixels of the model's
        input, as ``__call__`` scales ``input_boxes``."""
        resized = self.settings.resized_size(*original)
        return scale_coordinates(boxes[None], [original], [resized], False, self.coordinate_dtype)[0]

    def post_process_masks(
        self,
        masks: torch.Tensor | Sequence[torch.Tensor],
        original_sizes: Any,
        reshaped_input_sizes: Any = None,
        mask_threshold: float = 0.0,
        binarize: bool = True,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """Mask logits (B, P, K, h, w) (or one (P, K, h, w) per image) -> one (P, K, H, W) per image at
        its original size: bool above ``mask_threshold`` with ``binarize``, else the logits."""
        sizes = _pairs(original_sizes)
        reshaped = _pairs(reshaped_input_sizes) if reshaped_input_sizes is not None else None
        out = []
        for i, (h, w) in enumerate(sizes):
            logits = masks[i] if isinstance(masks[i], torch.Tensor) else torch.as_tensor(masks[i])
            rh, rw = reshaped[i] if reshaped is not None else self.settings.resized_size(h, w)
            upsampled = masks_to_image(logits.float(), self.settings, (rh, rw), (h, w))  # (P, K, H, W)
            out.append(upsampled > mask_threshold if binarize else upsampled)
        return out

    def _sizes(self, originals: np.ndarray, resized: np.ndarray) -> dict[str, torch.Tensor]:
        return {"original_sizes": torch.from_numpy(originals)}


def _pairs(sizes: Any) -> list[tuple[int, int]]:
    if isinstance(sizes, torch.Tensor):
        sizes = sizes.tolist()
    return [(int(h), int(w)) for h, w in np.asarray(sizes).reshape(-1, 2)]
