"""``gdino.integrations.fiftyone`` against real FiftyOne: ``dataset.apply_model(GdinoModel(...), confidence_thresh=0.3,
batch_size=4)`` with FiftyOne's bundled MongoDB (its database in a temp folder, offline, tracking off) on
generated shapes images, with the packaged gdino-shapes model: the ``fo.Detections`` it stores are
``detect``'s boxes relative to the image, its labels and scores, and with a segmenter the masks cropped
to the boxes. FiftyOne runs in .venv-fiftyone (scripts/fiftyone_venv.sh; it pins opencv < 5), so the
apply runs in a subprocess (tests/integrations/fiftyone_apply.py) and this side computes what it must be."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ellipse_segmenter import EllipseSegmenter
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.training.shapes import ShapesSettings, pair_names, render

ROOT = Path(__file__).parents[2]
PYTHON = ROOT / ".venv-fiftyone" / "bin" / "python"
SCRIPT = Path(__file__).with_name("fiftyone_apply.py")

pytestmark = [
    pytest.mark.slow,  # FiftyOne's MongoDB starts, and the shapes model runs on 6 images twice
    pytest.mark.skipif(not PYTHON.exists(), reason="no .venv-fiftyone: bash scripts/fiftyone_venv.sh makes it"),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    settings = ShapesSettings(grain=0.0, backgrounds=("flat", "gradient"))
    for seed in range(6):  # sizes differ: the batches of 4 are ragged
        scene = render(np.random.default_rng(seed), list(range(24)), settings)
        Image.fromarray(scene.image).save(folder / f"shape-{seed}.png")
    return folder


@pytest.fixture(scope="module")
def shapes_model() -> GroundingDinoForObjectDetection:
    return GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").eval()


def apply_model(images: Path, tmp_path: Path, masks: bool) -> tuple[dict, dict[str, np.ndarray]]:
    env = {
        **os.environ,
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_DATABASE_DIR": str(tmp_path / "db"),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(tmp_path / "datasets"),
        "FIFTYONE_CONFIG_PATH": str(tmp_path / "config.json"),  # no user config is read
        "HF_HUB_OFFLINE": "1",
    }
    out, arrays = tmp_path / "out.json", tmp_path / "masks.npz"
    command = [str(PYTHON), str(SCRIPT), str(images), str(out), str(arrays), *(["--masks"] if masks else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(arrays) as saved:
        return json.loads(out.read_text()), {k: saved[k] for k in saved.files}


def expected(model: GroundingDinoForObjectDetection, path: Path, masks: bool):
    found = model.detect(path, labels=pair_names(), box_threshold=0.3)
    return EllipseSegmenter().add_masks(path, found) if masks else found


def test_apply_model_stores_detects_boxes(images, shapes_model, tmp_path) -> None:
    result, arrays = apply_model(images, tmp_path, masks=False)
    assert result["samples"] == 6 and arrays == {}
    assert result["batches"] == [4, 2], "batch_size=4: 6 images in two predict_all calls"
    total = 0
    for path in sorted(images.glob("*.png")):
        found = expected(shapes_model, path, masks=False)
        rows = result["rows"][path.name]
        width, height = found.image_size
        assert [r["label"] for r in rows] == list(found.labels)
        relative = [[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height] for x0, y0, x1, y1 in found.boxes]
        np.testing.assert_allclose([r["bounding_box"] for r in rows], np.reshape(relative, (-1, 4)), atol=1e-5)
        np.testing.assert_allclose([r["confidence"] for r in rows], found.scores, atol=1e-5)
        assert all(r["confidence"] >= 0.3 for r in rows)
        total += len(rows)
    assert total >= 6, "the shapes model finds the generated shapes"


def test_apply_model_with_a_segmenter_stores_masks_over_the_boxes(images, shapes_model, tmp_path) -> None:
    result, arrays = apply_model(images, tmp_path, masks=True)
    checked = 0
    for path in sorted(images.glob("*.png")):
        found = expected(shapes_model, path, masks=True)
        assert len(result["rows"][path.name]) == len(found)
        for i in range(len(found)):
            mask = arrays[f"{path.name}:{i}"]
            assert mask.dtype == np.bool_
            x0, y0, x1, y1 = found.boxes[i]
            x0, y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
            x1, y1 = min(found.image_size[0], math.ceil(x1)), min(found.image_size[1], math.ceil(y1))
            assert np.array_equal(mask, found.masks.mask(i)[y0:y1, x0:x1]), "the mask over the box's pixels"
            checked += 1
    assert checked >= 6
