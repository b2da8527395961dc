"""The shapes model shipped in the package (``gdino-shapes``): it loads by name with no network,
and it still detects: AP50 on generated images it never saw, and the example the offline demo runs.

A regression in the model, processing or post-processing code shows up here as a fall in AP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gdino.utils.hub import CheckpointError, packaged_model_dir, resolve
from reference import ROOT

EXAMPLE = ROOT / "examples" / "shapes.png"
SHIPPED_AP50 = 0.848  # measured on the seed-777 set below when the model was packaged
RECOMMENDED = 0.25  # the packaged config.json's "gdino_defaults" (scripts/demo.sh gives no threshold)


@pytest.fixture(scope="module")
def shapes_model():
    from gdino.inference.detector import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection.from_pretrained("gdino-shapes")


def test_the_name_resolves_to_the_packaged_files_and_they_are_small():
    checkpoint = resolve("gdino-shapes", local_files_only=True)
    assert checkpoint.directory == packaged_model_dir("gdino-shapes")
    assert checkpoint.layout == "hf"
    files = {p.name: p.stat().st_size for p in checkpoint.directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    assert sum(files.values()) < 12e6, files  # a few MB: it ships in the wheel


def test_a_local_path_of_the_same_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gdino-shapes").mkdir()  # empty: resolving it must fail, proving it was the one taken
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        resolve("gdino-shapes")


def test_the_packaged_model_loads_in_fp32_with_its_processor(shapes_model):
    from gdino.models.grounding_dino.config import GroundingDinoConfig

    assert all(p.dtype == torch.float32 for p in shapes_model.parameters())
    assert shapes_model.config.d_model == GroundingDinoConfig.shapes().d_model
    assert sum(p.numel() for p in shapes_model.parameters()) < 5e6
    assert shapes_model.processor.image_settings.shortest_edge == 240  # trained at short side 240


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_packaged_model_brings_its_thresholds(shapes_model, tmp_path):
    """With no threshold given, detect uses the model's recommended ones (0.25), not the published
    model's 0.35, which finds fewer of the demo's shapes; an explicit threshold still wins."""
    from gdino.models.grounding_dino.config import GroundingDinoConfig

    assert shapes_model.config.detection_defaults() == {"box_threshold": RECOMMENDED, "text_threshold": RECOMMENDED}
    labels = ["red circle", "green circle", "yellow circle", "orange circle", "green square", "red triangle"]
    default = shapes_model.detect(EXAMPLE, labels)
    at = shapes_model.detect(EXAMPLE, labels, box_threshold=RECOMMENDED)
    published = shapes_model.detect(EXAMPLE, labels, box_threshold=0.35)
    assert default.labels == at.labels and np.array_equal(default.boxes, at.boxes)
    assert len(published) < len(default)
    # the defaults survive save and load, and a published config has none
    assert GroundingDinoConfig.from_hf_dict(shapes_model.config.to_hf_dict()) == shapes_model.config
    assert "gdino_defaults" not in GroundingDinoConfig.tiny().to_hf_dict()
    assert GroundingDinoConfig.tiny().detection_defaults() == {"box_threshold": 0.35, "text_threshold": 0.25}


def test_gdino_detect_finds_the_shapes_of_the_demo_image(tmp_path):
    """What ``scripts/demo.sh`` runs offline: most annotated shapes found with their own label, and
    every box on an annotated shape (nothing invented on the background)."""
    from gdino.apps.cli import main

    truth = json.loads((ROOT / "examples" / "shapes.json").read_text())
    names = {c["id"]: c["name"] for c in truth["categories"]}
    objects = [
        (
            names[a["category_id"]],
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
        )
        for a in truth["annotations"]
    ]
    labels = [*sorted({name for name, _ in objects}), "blue star", "purple square"]  # two that are absent
    out = tmp_path / "found.jsonl"
    assert (
        main(
            [
                "detect",
                str(EXAMPLE),
                "--model",
                "gdino-shapes",
                "--prompt",
                ",".join(labels),
                "--nms",
                "0.5",
                "--output",
                str(out),
                "--annotate",
                str(tmp_path / "drawn"),
            ]
        )
        == 0
    )
    found = json.loads(out.read_text())["detections"]
    right = [(n, b) for n, b in objects if any(d["label"] == n and _iou(d["box"], b) >= 0.5 for d in found)]
    assert len(right) >= 5, (right, found)  # measured: 5 of 6 (the green circle is missed)
    assert all(any(_iou(d["box"], b) >= 0.5 for _, b in objects) for d in found), found
    assert not {"blue star", "purple square"} & {d["label"] for d in found}
    assert (tmp_path / "drawn" / "shapes.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_shipped_model_keeps_its_measured_ap50_on_images_it_never_saw(shapes_model, tmp_path):
    """The shipped model on 60 images it never saw: AP50 0.848 when it was packaged, held to the
    target of 0.8 (on the training script's own 100 validation images it scores 0.865; README,
    "The shapes model"), and every seen pair found (median per-pair AP50 0.864, worst 0.715)."""
    from gdino.evaluation.coco import evaluate_coco, model_detector
    from gdino.training.shapes import write_shapes_dataset

    # seed 777: generated afresh, none of these images was in training (seed 0)
    paths = write_shapes_dataset(tmp_path, {"val": 60}, seed=777)
    evaluation = evaluate_coco(tmp_path, paths["val"], lambda names: model_detector(shapes_model, names))
    assert evaluation.failed == []
    assert evaluation.metrics["AP50"] >= min(SHIPPED_AP50 - 0.02, 0.8), evaluation.table
    seen = [v["AP50"] for v in evaluation.per_category.values() if v["AP50"] >= 0]
    assert len(seen) == 21 and float(np.median(seen)) >= 0.75, evaluation.per_category  # measured 0.864
    assert min(seen) >= 0.5, evaluation.per_category  # measured 0.715
