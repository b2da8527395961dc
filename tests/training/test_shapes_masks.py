"""The shapes generator's masks: each object's visible pixels, written as COCO polygons that rasterise back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gdino.training.segmenter_data import split_scenes
from gdino.training.shapes import ShapesSettings, load_photos, render, write_shapes_dataset
from reference import DATA

pytest.importorskip("cv2")
mask_utils = pytest.importorskip("pycocotools.mask")


def test_masks_are_the_visible_pixels_and_disjoint_where_objects_overlap():
    settings = ShapesSettings(max_overlap=0.3, objects=(5, 6), grain=0.0)
    overlapping = 0
    for seed in range(8):
        scene = render(np.random.default_rng(seed), list(range(24)), settings)
        assert scene.masks.shape == (len(scene.pairs), *scene.image.shape[:2]) and scene.masks.dtype == bool
        assert scene.masks.sum(0).max() <= 1  # a later object hides what it covers
        for box, mask in zip(scene.boxes.astype(int), scene.masks):
            ys, xs = np.nonzero(mask)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
            x0, y0, x1, y1 = box
            overlapping += scene.masks[:, y0:y1, x0:x1].any(axis=(1, 2)).sum() > 1
    assert overlapping > 0  # some boxes hold another object's pixels, which their masks leave out


def test_polygons_rasterise_to_the_masks_and_area_is_the_masks(tmp_path):
    settings = ShapesSettings(max_overlap=0.3)
    photos = [DATA / "chelsea.png"]
    paths = write_shapes_dataset(tmp_path, {"val": 4}, seed=3, settings=settings, photos=photos, masks=True)
    data = json.loads(paths["val"].read_text())
    plain = json.loads(
        write_shapes_dataset(tmp_path / "plain", {"val": 4}, seed=3, settings=settings, photos=photos)[
            "val"
        ].read_text()
    )
    assert all("segmentation" not in a for a in plain["annotations"])  # only when asked
    assert [a["bbox"] for a in plain["annotations"]] == [a["bbox"] for a in data["annotations"]]
    assert any(a["area"] < b["area"] for a, b in zip(data["annotations"], plain["annotations"]))
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    arrays = load_photos(photos)
    for info in data["images"]:
        scene = split_scenes("val", info["id"] - 1, 1, 3, settings, arrays)[0]
        found = by_image[info["id"]]
        assert len(found) == len(scene.masks)
        for annotation, mask in zip(found, scene.masks):
            rles = mask_utils.frPyObjects(annotation["segmentation"], info["height"], info["width"])
            drawn = mask_utils.decode(mask_utils.merge(rles)).astype(bool)
            assert (drawn != mask).sum() <= 2  # a polygon may fill a one-pixel notch of its outline
            assert annotation["area"] == int(mask.sum())
