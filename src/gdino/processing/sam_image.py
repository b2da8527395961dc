"""Images in and masks out for SAM and SAM 2.1: one implementation for the processors and the ``Segmenter``.

Resizing follows transformers' image processors (and the original repositories' transforms):

* SAM 2.1 (``Sam2ImageProcessor``, the original ``SAM2Transforms``): the image resized to the square
  ``size`` x ``size``, aspect ratio not kept, no padding; masks come back by one bilinear resize of
  the low-resolution logits to the original size.
* SAM and SAM-HQ (``SamImageProcessor``, the original ``ResizeLongestSide``): the longest side resized
  to ``size``, the other ``int(side * scale + 0.5)``, then zero padding at the bottom and right to the
  square ``pad_size``; masks come back resized to the padded square, cropped to the resized image and
  resized to the original size.

Pixels are resized with PIL's bilinear filter on the uint8 image (transformers' PIL backend;
its torchvision backend, which SAM 2.1's processor needs, differs by at most one grey level
where its uint8 kernel rounds differently), then scaled by 1/255 in float64 and normalised in
float32, as transformers' PIL backend does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from gdino.processing.image import IMAGENET_MEAN, IMAGENET_STD, ImageSettings, preprocess_image
from gdino.utils.hub import resolve

if TYPE_CHECKING:  # torch is imported by the two functions on tensors: the ONNX runtime reads the rest without it
    import torch

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True)
class SamImageSettings:
    """How images are prepared, as in ``preprocessor_config.json``.

    Attributes:
        square: True for SAM 2.1 (resize to ``size`` x ``size``), False for SAM (longest side, then pad).
        size: the square side (SAM 2.1) or the longest side after resizing (SAM).
        pad_size: SAM: the padded square's side; SAM 2.1: equal to ``size``.
        image_mean, image_std: per channel R G B, applied after rescaling.
        rescale_factor: what the uint8 pixels are multiplied by first.
        resample: the PIL filter of the resize.
    """

    square: bool
    size: int = 1024
    pad_size: int = 1024
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BILINEAR

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], square: bool) -> SamImageSettings:
        """Reads transformers' ``preprocessor_config.json`` (``Sam2ImageProcessor`` or ``SamImageProcessor``).

        Raises:
            ValueError: a setting this implementation does not follow (named).
        """
        for key in ("do_resize", "do_rescale", "do_normalize"):
            if d.get(key, True) is not True:
                raise ValueError(f"{PREPROCESSOR_FILE}: {key} = {d[key]!r} is not supported (only true)")
        size = d.get("size", {})
        if square:
            side = int(size.get("height", 1024)) if isinstance(size, dict) else int(size)
            if isinstance(size, dict) and int(size.get("width", side)) != side:
                raise ValueError(f"{PREPROCESSOR_FILE}: size {size} is not square, as SAM 2.1's input must be")
            pad = side
        else:
            side = int(size.get("longest_edge", 1024)) if isinstance(size, dict) else int(size)
            pad_size = d.get("pad_size", {"height": side, "width": side})
            pad = int(pad_size.get("height", side)) if isinstance(pad_size, dict) else int(pad_size)
            if d.get("do_pad", True) is not True or pad < side:
                raise ValueError(f"{PREPROCESSOR_FILE}: SAM's images must be padded to a square of at least {side}")
        return cls(
            square=square,
            size=side,
            pad_size=pad,
            image_mean=tuple(float(v) for v in d.get("image_mean", IMAGENET_MEAN)),
            image_std=tuple(float(v) for v in d.get("image_std", IMAGENET_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=int(d.get("resample", Image.Resampling.BILINEAR)),
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of an image after resizing (before SAM's padding)."""
        if self.square:
            return self.size, self.size
        scale = self.size * 1.0 / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)


def read_settings(path_or_id: str | os.PathLike[str], square: bool, **hub: Any) -> SamImageSettings:
    """The settings of a hub id, directory or checkpoint file: its ``preprocessor_config.json``, else defaults."""
    path = Path(path_or_id).expanduser()
    directory = path if path.is_dir() else path.parent if path.is_file() else resolve(path_or_id, **hub).directory
    file = directory / PREPROCESSOR_FILE if directory is not None else None
    if file is None or not file.is_file():
        return SamImageSettings(square=square)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return SamImageSettings.from_hf_dict(data.get("image_processor", data), square)


def image_pixels(image: Image.Image, settings: SamImageSettings) -> tuple[np.ndarray, tuple[int, int]]:
    """One RGB image -> its model input (3, pad_size, pad_size) float32 and its resized (height, width)."""
    h, w = settings.resized_size(image.height, image.width)
    resized = image.resize((w, h), resample=Image.Resampling(settings.resample))
    normalise = ImageSettings(
        do_resize=False,
        image_mean=settings.image_mean,
        image_std=settings.image_std,
        rescale_factor=settings.rescale_factor,
    )
    pixels = preprocess_image(resized, normalise)  # (3, h, w)
    if (h, w) == (settings.pad_size, settings.pad_size):
        return pixels, (h, w)
    padded = np.zeros((3, settings.pad_size, settings.pad_size), np.float32)
    padded[:, :h, :w] = pixels
    return padded, (h, w)


def masks_to_image(
    masks: torch.Tensor, settings: SamImageSettings, resized: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """Low-resolution mask logits (P, K, h, w) -> logits (P, K, H, W) at the original (H, W).

    SAM 2.1: one bilinear resize (``Sam2ImageProcessor.post_process_masks``, the original
    ``SAM2Transforms.postprocess_masks``). SAM: resized to the padded square, cropped to the
    resized image, resized to the original (``SamImageProcessor.post_process_masks``,
    ``Sam.postprocess_masks``).
    """
    import torch.nn.functional as F

    if not settings.square:
        side = settings.pad_size
        masks = F.interpolate(masks, (side, side), mode="bilinear", align_corners=False)
        masks = masks[..., : resized[0], : resized[1]]  # (P, K, h', w') the image without its padding
    return F.interpolate(masks, original, mode="bilinear", align_corners=False)


def low_res_frame(
    masks: torch.Tensor, settings: SamImageSettings, resized: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Logits (P, K, h, w) -> the logits whose single bilinear resize gives the original image's,
    and nothing else: SAM 2.1's as they are; SAM's resized to the padded square and cropped."""
    import torch.nn.functional as F

    if settings.square:
        return masks, (masks.shape[-2], masks.shape[-1])
    side = settings.pad_size
    masks = F.interpolate(masks, (side, side), mode="bilinear", align_corners=False)
    return masks[..., : resized[0], : resized[1]], resized  # (P, K, h', w')
