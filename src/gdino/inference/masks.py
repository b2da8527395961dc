"""``Masks``: one binary mask per detection, kept small until a full-size array is asked for.

A mask is stored as the crop of its own tight bounding box (where it is true), with the crop's
offset in the image, so 200 masks of a 4000x3000 image cost what their objects cover, not
200 x 12 MB. ``dense`` and ``mask`` give full-size arrays; ``to_rle`` gives COCO compressed RLE
(pycocotools, ``gdino[masks]``) and ``polygons`` the outer contours as COCO polygons
(OpenCV, ``gdino[masks]``), the two encodings every export format is written from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_MISSING = "{what} needs {package}: pip install 'gdino[masks]'"


@dataclass(frozen=True)
class Masks:
    """N binary masks of one image.

    Attributes:
        crops: N bool arrays (h_i, w_i), each mask's tight bounding box; (0, 0) for an empty mask.
        offsets: (N, 2) int64 (x0, y0) of each crop in the image.
        image_size: (width, height) of the image.
    """

    crops: tuple[np.ndarray, ...]
    offsets: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        if self.offsets.shape != (len(self.crops), 2):
            raise ValueError(f"offsets must be ({len(self.crops)}, 2), got {self.offsets.shape}")
        width, height = self.image_size
        for crop, (x0, y0) in zip(self.crops, self.offsets):
            if crop.dtype != np.bool_ or crop.ndim != 2:
                raise ValueError(f"each crop must be a 2-D bool array, got {crop.dtype} {crop.shape}")
            if x0 < 0 or y0 < 0 or x0 + crop.shape[1] > width or y0 + crop.shape[0] > height:
                raise ValueError(f"a crop of {crop.shape} at ({x0}, {y0}) leaves the {width}x{height} image")

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> Masks:
        return cls((), np.zeros((0, 2), np.int64), image_size)

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> Masks:
        """(N, H, W) bool (or 0/1) full-size masks -> their crops."""
        if masks.ndim != 3:
            raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
        crops = [crop_mask(m.astype(bool, copy=False), (0, 0)) for m in masks]
        return cls.from_crops(crops, (masks.shape[2], masks.shape[1]))

    @classmethod
    def from_crops(cls, crops: Sequence[tuple[np.ndarray, tuple[int, int]]], image_size: tuple[int, int]) -> Masks:
        """``crop_mask`` results (crop, (x0, y0)) -> Masks."""
        offsets = np.array([offset for _, offset in crops], np.int64).reshape(-1, 2)
        return cls(tuple(crop for crop, _ in crops), offsets, image_size)

    @staticmethod
    def concatenate(parts: Sequence[Masks], image_size: tuple[int, int]) -> Masks:
        """The masks of several sets of one image, in order."""
        crops = tuple(crop for part in parts for crop in part.crops)
        offsets = np.concatenate([part.offsets for part in parts]) if parts else np.zeros((0, 2), np.int64)
        return Masks(crops, offsets.astype(np.int64), image_size)

    def select(self, indices: np.ndarray | Sequence[int]) -> Masks:
        """The masks at ``indices`` (ints), in that order."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Masks(tuple(self.crops[i] for i in index), self.offsets[index], self.image_size)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` at full size: (H, W) bool."""
        width, height = self.image_size
        full = np.zeros((height, width), bool)
        crop = self.crops[i]
        x0, y0 = (int(v) for v in self.offsets[i])
        full[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return full

    def dense(self) -> np.ndarray:
        """Every mask at full size: (N, H, W) bool. N full images: for few masks or small images."""
        width, height = self.image_size
        if not self.crops:
            return np.zeros((0, height, width), bool)
        return np.stack([self.mask(i) for i in range(len(self))])

    def areas(self) -> np.ndarray:
        """(N,) int64 pixels in each mask."""
        return np.array([int(crop.sum()) for crop in self.crops], np.int64)

    def boxes(self) -> np.ndarray:
        """(N, 4) float32 x0 y0 x1 y1 of each mask's tight pixel bounds (zeros for an empty mask)."""
        sizes = np.array([(c.shape[1], c.shape[0]) for c in self.crops], np.int64).reshape(-1, 2)
        return np.concatenate([self.offsets, self.offsets + sizes], axis=1).astype(np.float32) * (sizes > 0).all(
            axis=1, keepdims=True
        )

    def to_rle(self) -> list[dict[str, Any]]:
        """COCO compressed RLE of each mask at full size: ``{"size": [h, w], "counts": str}``, as
        pycocotools' ``mask.encode`` writes it (column-major runs)."""
        try:
            from pycocotools import mask as mask_utils
        except ImportError as error:
            raise ImportError(_MISSING.format(what="COCO RLE", package="pycocotools")) from error
        encoded = []
        for i in range(len(self)):
            rle = mask_utils.encode(np.asfortranarray(self.mask(i).astype(np.uint8)))
            encoded.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
        return encoded

    def polygons(self, i: int, min_area: float = 1.0) -> list[list[float]]:
        """Mask ``i``'s outer boundaries in image pixels as COCO polygons ``[[x0, y0, x1, y1, ...], ...]``
        (OpenCV's ``findContours``), one per connected part of at least 3 points and ``min_area``
        pixels; [] for an empty mask. COCO reads a polygon list as the union of its polygons, so
        holes are not kept (RLE keeps them); a mask without holes rasterises back to itself."""
        try:
            import cv2
        except ImportError as error:
            raise ImportError(_MISSING.format(what="mask polygons", package="opencv-python-headless")) from error
        crop = self.crops[i]
        if crop.size == 0:
            return []
        # Contours run through boundary pixels' centres; traced on the mask at twice the size (and
        # padded so a mask touching its crop's edge still closes), a contour point u maps to
        # (u + 0.5) / 2: a quarter pixel outside each pixel centre, so the polygon rasterises
        # (pycocotools' frPyObjects) back to the same pixels instead of losing a half-pixel rim.
        doubled = np.pad(crop, 1).repeat(2, axis=0).repeat(2, axis=1).astype(np.uint8)
        contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        x0, y0 = (float(v) - 1.0 for v in self.offsets[i])
        polygons = []
        for contour in contours:
            points = contour.reshape(-1, 2).astype(np.float64)  # (K, 2) x y in the doubled crop
            if len(points) < 3 or cv2.contourArea(contour) < 4 * min_area:
                continue
            points = (points + 0.5) / 2 + (x0, y0)
            polygons.append([round(float(v), 2) for v in points.reshape(-1)])
        return polygons


def crop_mask(mask: np.ndarray, offset: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A bool mask (h, w) placed at ``offset`` (x0, y0) -> its tight crop and the crop's offset."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 0), bool), (0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    crop = np.ascontiguousarray(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return crop, (offset[0] + int(cols[0]), offset[1] + int(rows[0]))
