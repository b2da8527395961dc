"""The synthetic shapes data set: boxes on their pixels, deterministic, held-out pairs kept out of training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gdino.training.datasets import read_coco
from gdino.training.shapes import (
    COLOURS,
    SHAPES,
    ShapesSettings,
    find_photos,
    load_photos,
    pair_names,
    render,
    write_shapes_dataset,
)
from reference import DATA


def test_pairs_are_every_colour_and_shape():
    names = pair_names()
    assert len(names) == 24 and names[0] == "red circle" and "blue square" in names and "orange star" in names
    assert set(COLOURS) >= {"red", "green", "blue", "yellow", "purple", "orange"}
    assert set(SHAPES) == {"circle", "square", "triangle", "star"}


def test_each_box_is_the_tight_bounds_of_its_coloured_pixels():
    settings = ShapesSettings(grain=0.0, backgrounds=("flat", "gradient"), max_overlap=0.0)
    names = pair_names()
    counts, rotated = [], 0
    for seed in range(12):
        scene = render(np.random.default_rng(seed), list(range(24)), settings)
        counts.append(len(scene.pairs))
        image = scene.image.astype(int)
        for box, pair in zip(scene.boxes.astype(int), scene.pairs):
            colour = np.array(COLOURS[names[pair].split()[0]])
            near = (np.abs(image - colour) <= settings.colour_jitter).all(-1)
            x0, y0, x1, y1 = box
            around = near[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2]
            ys, xs = np.nonzero(around)
            found = [
                xs.min() + max(x0 - 2, 0),
                ys.min() + max(y0 - 2, 0),
                xs.max() + 1 + max(x0 - 2, 0),
                ys.max() + 1 + max(y0 - 2, 0),
            ]
            assert found == box.tolist(), (seed, names[pair])
            fill = near[y0:y1, x0:x1].mean()
            if names[pair].endswith("square"):
                rotated += fill < 0.97  # a turned square does not fill its box
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 3
    assert rotated > 0


def test_the_same_seed_gives_the_same_files(tmp_path):
    counts = {"train": 3, "held_out": 2}
    a = write_shapes_dataset(tmp_path / "a", counts, seed=4, photos=[DATA], image_format="png")
    b = write_shapes_dataset(tmp_path / "b", counts, seed=4, photos=[DATA], image_format="png")
    c = write_shapes_dataset(tmp_path / "c", counts, seed=5, photos=[DATA], image_format="png")
    for split, count in counts.items():
        assert a[split].read_text() == b[split].read_text() != c[split].read_text()
        for i in range(count):
            name = f"{split}/{i:05d}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_held_out_pairs_are_absent_from_training_and_in_every_held_out_image(tmp_path):
    settings = ShapesSettings(held_out=("green triangle", "blue star"))
    paths = write_shapes_dataset(
        tmp_path, {"train": 30, "val": 5, "held_out": 10}, seed=0, settings=settings, photos=[DATA]
    )
    names = pair_names()
    held_ids = {names.index(p) + 1 for p in settings.held_out}
    train = json.loads(paths["train"].read_text())
    assert {c["id"] for c in train["categories"]} == set(range(1, 25)) - held_ids
    assert not held_ids & {a["category_id"] for a in train["annotations"]}
    val, held = json.loads(paths["val"].read_text()), json.loads(paths["held_out"].read_text())
    assert not held_ids & {a["category_id"] for a in val["annotations"]}
    for data in (val, held):  # evaluation splits list every pair with the same ids
        assert [(c["id"], c["name"]) for c in data["categories"]] == [(i + 1, n) for i, n in enumerate(names)]
    per_image = {}
    for a in held["annotations"]:
        per_image.setdefault(a["image_id"], set()).add(a["category_id"])
    assert len(per_image) == 10 and all(ids & held_ids for ids in per_image.values())
    # the readers load it as any COCO data; the non-contiguous training ids map back exactly
    data = read_coco(paths["train"])
    assert len(data) == 30 and not data.problems and "green triangle" not in data.names
    assert data.ids == tuple(sorted(set(range(1, 25)) - held_ids))
    assert all(data.names[label] == names[data.ids[label] - 1] for s in data.samples for label in s.labels)
    assert len(read_coco(paths["held_out"])) == 10


def test_photos_are_found_at_run_time_or_given_and_else_left_out():
    found = find_photos()
    assert {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"} <= {p.name for p in found}
    photos = load_photos(find_photos([DATA / "chelsea.png"]))
    assert len(photos) == 1 and photos[0].shape == (300, 451, 3)
    only_photos = ShapesSettings(backgrounds=("photo",))
    scene = render(np.random.default_rng(0), [0], only_photos, photos)
    assert scene.background == "photo"
    assert scene.image.std() > 10
    assert render(np.random.default_rng(0), [0], only_photos, ()).background == "flat"
    with pytest.raises(ValueError, match="not colour-shape pairs"):
        write_shapes_dataset(Path("/nonexistent"), {"train": 1}, settings=ShapesSettings(held_out=("pink cube",)))
