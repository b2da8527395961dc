"""``Masks``: cropped storage gives back the full masks; RLE and polygons decode, through pycocotools, to them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gdino.inference.detections import Detections
from gdino.inference.masks import Masks

mask_utils = pytest.importorskip("pycocotools.mask")
pytest.importorskip("cv2")


def _blobs(n: int, size: tuple[int, int] = (120, 90), seed: int = 0) -> np.ndarray:
    """(n, H, W) bool ellipses of varied size, some cut by the image's edge; the last one empty."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n - 1):
        image = Image.new("L", size)
        cx, cy, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(2, 30)
        ImageDraw.Draw(image).ellipse([cx - r, cy - r * 0.7, cx + r, cy + r], fill=1)
        masks.append(np.array(image, bool))
    masks.append(np.zeros(size[::-1], bool))
    return np.stack(masks)


def test_crops_give_back_the_masks_and_their_bounds() -> None:
    dense = _blobs(12)
    masks = Masks.from_dense(dense)
    assert np.array_equal(masks.dense(), dense)
    assert masks.areas().tolist() == dense.sum(axis=(1, 2)).tolist()
    assert sum(c.size for c in masks.crops) < dense[0].size * 3  # crops, not full images
    for box, mask in zip(masks.boxes(), dense):
        if not mask.any():
            assert box.tolist() == [0, 0, 0, 0]
            continue
        ys, xs = np.nonzero(mask)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    picked = masks.select([3, 0])
    assert np.array_equal(picked.dense(), dense[[3, 0]])


def test_rle_is_pycocotools_encoding() -> None:
    dense = _blobs(6)
    for rle, mask in zip(Masks.from_dense(dense).to_rle(), dense):
        assert rle["size"] == [90, 120]
        assert rle == {
            "size": [90, 120],
            "counts": mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode(),
        }
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)


def test_polygons_rasterise_back_to_the_mask() -> None:
    dense = _blobs(10, seed=1)
    masks = Masks.from_dense(dense)
    for i, mask in enumerate(dense):
        polygons = masks.polygons(i)
        if not mask.any():
            assert polygons == []
            continue
        decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 90, 120))).astype(bool)
        assert np.array_equal(decoded, mask), i


def test_bad_crops_and_mismatched_detections_are_refused() -> None:
    with pytest.raises(ValueError, match="leaves the"):
        Masks((np.ones((5, 5), bool),), np.array([[118, 0]]), (120, 90))
    with pytest.raises(ValueError, match="bool"):
        Masks((np.ones((5, 5), np.uint8),), np.array([[0, 0]]), (120, 90))
    found = Detections(
        np.zeros((2, 4), np.float32), np.ones(2, np.float32), ("a", "b"), np.zeros(2, np.int64), (120, 90)
    )
    with pytest.raises(ValueError, match="2 detections"):
        found.with_masks(Masks.from_dense(_blobs(3)), np.ones(3))
    with_masks = found.with_masks(Masks.from_dense(_blobs(2)), np.array([0.9, 0.5]))
    records = with_masks.to_list()
    assert records[0]["mask_score"] == 0.9 and records[1]["mask"]["size"] == [90, 120]
