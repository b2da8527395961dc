"""Image side of the processor: loading, RGB conversion, resizing, normalisation and padding.

Matches the Hugging Face Grounding DINO image processor: the shorter side is resized to 800 and
the longer side capped at 1333 (PIL bilinear, sizes truncated with ``int``), pixels scaled by
1/255 and normalised with the ImageNet mean/std, and a batch padded at the bottom/right to its
largest height and width with a ``pixel_mask`` marking the real pixels.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Image.Image | np.ndarray | str | os.PathLike


class ImageError(ValueError):
    """An image cannot be read or is not in a supported form."""


@dataclass(frozen=True)
class ImageSettings:
    """Preprocessing parameters, as in ``preprocessor_config.json``."""

    shortest_edge: int = 800
    longest_edge: int | None = 1333
    image_mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, R G B
    image_std: tuple[float, ...] = IMAGENET_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ImageSettings:
        """Reads the Hugging Face image processor dict (``preprocessor_config.json`` layout).

        Raises:
            ValueError: for settings this implementation does not support.
        """
        if d.get("do_pad", True) is False:
            raise ValueError("do_pad=False is not supported: batches are always padded")
        size = d.get("size", {"shortest_edge": 800, "longest_edge": 1333})
        if isinstance(size, int):  # legacy layout: size + max_size
            size = {"shortest_edge": size, "longest_edge": d.get("max_size")}
        if not isinstance(size, dict) or "shortest_edge" not in size:
            raise ValueError(f"unsupported image size setting {size!r}; expected shortest_edge/longest_edge")
        return cls(
            shortest_edge=int(size["shortest_edge"]),
            longest_edge=None if size.get("longest_edge") is None else int(size["longest_edge"]),
            image_mean=tuple(float(v) for v in d.get("image_mean", IMAGENET_MEAN)),
            image_std=tuple(float(v) for v in d.get("image_std", IMAGENET_STD)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            resample=int(d.get("resample", Image.Resampling.BILINEAR)),
            do_resize=bool(d.get("do_resize", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
        )


# --------------------------------------------------------------------------- loading


def _open_file(path: Path) -> Image.Image:
    """Opens and fully decodes an image file, EXIF orientation applied."""
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)  # said once here, below
            with Image.open(path) as img:
                img.load()
                if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
                    _say_large(path, img)
                return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path} is too large to decode safely ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"cannot identify {path} as an image (not an image file, or a corrupt header)") from exc
    except Exception as exc:  # truncated / corrupt data: OSError, SyntaxError, EOFError ...
        raise ImageError(f"cannot decode image file {path} (truncated or corrupt?): {exc}") from exc


def _say_large(path: Path, img: Image.Image) -> None:
    """One log line for an image over PIL's decompression-bomb size, instead of PIL's warning."""
    pixels = img.width * img.height
    megabytes = pixels * len(img.getbands()) / 1e6
    log.warning(
        "%s is %dx%d (%.0f megapixels): decoding it takes about %.0f MB",
        path,
        img.width,
        img.height,
        pixels / 1e6,
        megabytes,
    )


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Modes I;16*, I and F (one channel, wide range) -> ``L``, scaled by their bit depth."""
    arr = np.asarray(img).astype(np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if img.mode == "F" and top <= 1.0:
        arr = arr * 255.0  # float image in [0, 1]
    elif img.mode.startswith("I;16") or top > 255:
        if top > 65535 or arr.min() < 0:
            raise ImageError(f"mode {img.mode} image has values outside 0..65535; cannot map it to 8 bits")
        arr = arr / 257.0  # 16-bit range -> 8-bit range
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to ``RGB``; transparency is composited onto white (as HF does)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_depth_to_8bit(img).convert("RGB")
    try:
        if "A" in img.getbands() or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot convert a mode {img.mode} image to RGB: {exc}") from exc


def _from_array(arr: np.ndarray) -> Image.Image:
    """A ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` uint8 array -> PIL image."""
    if arr.dtype != np.uint8:
        raise ImageError(
            f"numpy images must be uint8 in 0..255, got dtype {arr.dtype}; convert e.g. with "
            "(arr * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr), mode="L")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), mode="RGB" if arr.shape[-1] == 3 else "RGBA")
    raise ImageError(
        f"numpy image has shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4) "
        "(for channels-first arrays use arr.transpose(1, 2, 0))"
    )


def read_annotated_image(path: str | os.PathLike[str], size: tuple[int, int] | None) -> np.ndarray:
    """The image as its annotations see it, ``(H, W, 3)`` uint8: as stored, or EXIF-rotated when only
    that fits ``size`` (width, height; None takes it as stored). ``gdino eval coco`` and the training
    data read images by this rule.

    Raises:
        ImageError: the file cannot be read, or its size fits the annotations' neither way.
    """
    try:
        with Image.open(path) as img:
            img.load()
            raw = img.copy()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 (truncated, corrupt, not an image ...)
        raise ImageError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if size is not None and raw.size != size:
        rotated = ImageOps.exif_transpose(raw)
        if rotated.size != size:
            raise ImageError(f"{path} is {raw.size[0]}x{raw.size[1]} but the annotations say {size[0]}x{size[1]}")
        raw = rotated
    return np.asarray(to_rgb(raw))


def load_image(image: ImageLike) -> Image.Image:
    """Any supported image input -> an RGB PIL image.

    Args:
        image: a ``PIL.Image.Image``, a uint8 numpy array ``(H, W)``, ``(H, W, 3)`` or
            ``(H, W, 4)``, or the path of an image file (``str`` or ``os.PathLike``).

    Returns:
        An ``RGB`` image, EXIF orientation applied for files and PIL images.

    Raises:
        ImageError: unreadable file, unsupported type, shape, dtype or mode, or an empty image.
    """
    if isinstance(image, Image.Image):
        try:
            img = ImageOps.exif_transpose(image)
        except Exception as exc:
            raise ImageError(f"cannot read the PIL image (truncated or corrupt?): {exc}") from exc
    elif isinstance(image, np.ndarray):
        img = _from_array(image)
    elif isinstance(image, (str, os.PathLike)):
        img = _open_file(Path(image))
    else:
        raise ImageError(
            f"unsupported image type {type(image).__name__}; give a PIL.Image.Image, a uint8 numpy "
            "array (H, W, 3) or a file path"
        )
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image has no pixels (size {img.width}x{img.height})")
    return to_rgb(img)


# --------------------------------------------------------------------------- transforms


def resized_size(height: int, width: int, shortest_edge: int, longest_edge: int | None) -> tuple[int, int]:
    """Output ``(height, width)``: shorter side ``shortest_edge``, longer side at most ``longest_edge``.

    Follows the HF/DETR rule exactly, including its ``int`` truncation and rounding.
    """
    size, raw = shortest_edge, None
    if longest_edge is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > longest_edge:
            raw = longest_edge * short / long
            size = round(raw)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    scale = raw if raw is not None else size
    if width < height:
        return int(scale * height / width), size
    return size, int(scale * width / height)


def preprocess_image(img: Image.Image, settings: ImageSettings) -> np.ndarray:
    """Resizes, rescales and normalises one RGB image.

    Args:
        img: an ``RGB`` PIL image (see :func:`load_image`).
        settings: the preprocessing parameters.

    Returns:
        ``(3, H, W)`` float32 array, ``H, W`` the resized size.
    """
    if settings.do_resize:
        h, w = resized_size(img.height, img.width, settings.shortest_edge, settings.longest_edge)
        # Fitting the long side of an image over ~2666:1 leaves 0 pixels across (where the HF
        # processor fails); one pixel keeps the image, and the model copes with few tokens.
        h, w = max(h, 1), max(w, 1)
        img = img.resize((w, h), resample=Image.Resampling(settings.resample))
    arr = np.asarray(img)
    # Same arithmetic as HF: rescale in float64, then normalise in float32.
    pixels = (arr.astype(np.float64) * settings.rescale_factor if settings.do_rescale else arr).astype(np.float32)
    if settings.do_normalize:
        mean = np.asarray(settings.image_mean, dtype=np.float32)
        std = np.asarray(settings.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def pad_batch(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``(3, H_i, W_i)`` images with zeros at the bottom/right to the largest ``H`` and ``W``.

    Returns:
        ``pixel_values`` ``(B, 3, H, W)`` float32 and ``pixel_mask`` ``(B, H, W)`` int64, 1 on
        real pixels and 0 on padding.
    """
    if len(images) == 0:
        raise ImageError("no images given")
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    values = np.zeros((len(images), 3, height, width), dtype=np.float32)
    mask = np.zeros((len(images), height, width), dtype=np.int64)
    for i, im in enumerate(images):
        values[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = 1
    return values, mask


def images_to_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One image or a list/tuple of images -> a non-empty list of images."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ImageError("the list of images is empty")
        return list(images)
    return [cast(ImageLike, images)]  # anything but a list or tuple is one image
