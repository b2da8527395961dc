"""``gdino eval coco``: the 12 numbers for detections built with known IoUs and scores, worked out by
hand (COCO's 101-point interpolated AP), and one run of the command with the small model.

The hand-made dataset: two 200x200 images; categories "cat" (id 3) and "dog" (id 7); a third
image entry whose file is missing (no objects). Cat: four 50x50 objects (medium), G1 G2 in image
a, G3 G4 in image b. Dog: one 150x150 object (large) G5 in image b. Detections:

    d1 cat 0.90 a  = G1                   IoU 1
    d2 cat 0.80 a  = G2 moved 12 px       IoU 38/62 = 0.613: matches at IoU 0.50, 0.55, 0.60
    d3 cat 0.70 b  nowhere (40x40)        false positive
    d4 cat 0.60 b  = G3 moved 5 px        IoU 45/55 = 0.818: matches at 0.50 ... 0.80
    d6 dog 0.55 a  100x100 (large)        false positive
    d5 dog 0.50 b  = G5                   IoU 1

Cat, by IoU threshold (4 objects; recall / precision after each detection):
    0.50-0.60: TP TP FP TP: recall .25 .5 .5 .75, precision 1 1 2/3 3/4; interpolated precision is
               1 for recall 0..0.50 (51 of the 101 points) and 3/4 for 0.51..0.75 (25): 69.75 / 101
    0.65-0.80: TP FP FP TP: recall .25 .25 .25 .5; 1 for 0..0.25 (26), 1/2 for 0.26..0.50 (25): 38.5 / 101
    0.85-0.95: TP FP FP FP: 1 for 0..0.25: 26 / 101
    AP(cat) = (3 * 69.75 + 4 * 38.5 + 3 * 26) / 1010 = 441.25 / 1010
Dog: FP then TP at every threshold: precision 0 then 1/2, interpolated 1/2 everywhere: AP(dog) = 1/2.
    AP = (441.25 / 1010 + 1/2) / 2, AP50 = (69.75 / 101 + 1/2) / 2, AP75 = (38.5 / 101 + 1/2) / 2
    APs = -1 (no small object), APm = AP(cat) (dog has no medium object), APl = AP(dog) = 1/2
Recall: cat finds 3, 2, 1 of 4 objects at 3, 4, 3 thresholds: 0.5; dog 1. AR100 = AR10 = 0.75.
    With one detection per image and category, cat keeps d1 (a) and d3 (b): 1/4; dog keeps d6 (a)
    and d5 (b): 1. AR1 = 0.625. ARs = -1, ARm = 0.5 (cat), ARl = 1 (dog).
With --max-dets 2, image a keeps d1 d2 and image b keeps d3 d4: no dog detections, AP(dog) = 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gdino.evaluation.coco import METRICS, evaluate_coco


def _box(x, y, w, h):
    return [x, y, x + w, y + h]


GT = {  # file -> [(category id, x, y, w, h)]
    "a.png": [(3, 10, 10, 50, 50), (3, 100, 10, 50, 50)],
    "b.png": [(3, 10, 100, 50, 50), (3, 100, 100, 50, 50), (7, 20, 20, 150, 150)],
}
FOUND = {  # file -> [(category index: 0 cat, 1 dog), score, x0 y0 x1 y1]
    "a.png": [(0, 0.9, _box(10, 10, 50, 50)), (0, 0.8, _box(112, 10, 50, 50)), (1, 0.55, _box(50, 50, 100, 100))],
    "b.png": [(0, 0.7, _box(150, 0, 40, 40)), (0, 0.6, _box(15, 100, 50, 50)), (1, 0.5, _box(20, 20, 150, 150))],
}
AP_CAT = 441.25 / 1010
EXPECTED = {
    "AP": (AP_CAT + 0.5) / 2,
    "AP50": (69.75 / 101 + 0.5) / 2,
    "AP75": (38.5 / 101 + 0.5) / 2,
    "APs": -1.0,
    "APm": AP_CAT,
    "APl": 0.5,
    "AR1": 0.625,
    "AR10": 0.75,
    "AR100": 0.75,
    "ARs": -1.0,
    "ARm": 0.5,
    "ARl": 1.0,
}


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    entries, annotations = [], []
    for image_id, name in enumerate(["a.png", "b.png", "missing.png"], start=1):
        entries.append({"id": image_id, "file_name": name, "width": 200, "height": 200})
        if name != "missing.png":
            Image.new("RGB", (200, 200), (90, 120, 150)).save(images / name)
        for category, x, y, w, h in GT.get(name, []):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]  # not in id order
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return images, path


def _fake(names: list[str]):
    assert names == ["cat", "dog"]  # sorted by category id

    def detect(image: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert image.shape == (200, 200, 3) and image.dtype == np.uint8
        found = FOUND[info["file_name"]]
        return (
            np.array([f[2] for f in found], dtype=np.float32),
            np.array([f[1] for f in found]),
            np.array([f[0] for f in found]),
        )

    return detect


def test_twelve_numbers_by_hand(dataset):
    images, annotations = dataset
    result = evaluate_coco(images, annotations, _fake)
    assert list(result.metrics) == list(METRICS)
    for name in METRICS:
        assert result.metrics[name] == pytest.approx(EXPECTED[name], abs=1e-9), name
    assert result.images == 3
    assert [name for name, _ in result.failed] == ["missing.png"]
    assert "not found" in result.failed[0][1]
    assert len(result.table.strip().splitlines()) == 12
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.468" in result.table
    first = result.results[0]
    assert first == {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.9}
    assert sorted(r["category_id"] for r in result.results) == [3, 3, 3, 3, 7, 7]


def test_max_dets_keeps_the_best(dataset):
    images, annotations = dataset
    result = evaluate_coco(images, annotations, _fake, max_dets=2)
    assert len(result.results) == 4
    assert result.metrics["AP"] == pytest.approx(AP_CAT / 2, abs=1e-9)  # dog: nothing left, AP 0
    assert result.metrics["APl"] == pytest.approx(0.0, abs=1e-9)


def test_nothing_found_scores_zero(dataset):
    images, annotations = dataset
    result = evaluate_coco(
        images, annotations, lambda names: lambda image, info: (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))
    )
    assert result.results == []
    assert result.metrics["AP"] == 0.0 and result.metrics["AR100"] == 0.0 and result.metrics["APs"] == -1.0


def test_a_failing_image_is_reported(dataset):
    images, annotations = dataset

    def make(names):
        good = _fake(names)

        def detect(image, info):
            if info["file_name"] == "b.png":
                raise RuntimeError("boom")
            return good(image, info)

        return detect

    result = evaluate_coco(images, annotations, make)
    assert result.failed[0] == ("b.png", "detection failed: RuntimeError: boom")
    assert [name for name, _ in result.failed] == ["b.png", "missing.png"]
    assert {r["image_id"] for r in result.results} == {1}
    # image a alone: cat d1 TP, d2 TP at 0.50-0.60 of 4 objects; dog d6 FP of 1 object
    assert result.metrics["AR100"] == pytest.approx((0.5 * 3 + 0.25 * 7) / 10 / 2, abs=1e-9)


# --------------------------------------------------------------------------- the command, small model


@pytest.mark.slow  # gdino eval coco in a subprocess
def test_command_end_to_end(fast_dir, data_dir, tmp_path):
    from gdino import GroundingDinoForObjectDetection

    categories = [{"id": 18, "name": "dog"}, {"id": 47, "name": "cup"}, {"id": 10, "name": "traffic_light"}]
    entries = [
        {"id": 5, "file_name": "chelsea.png", "width": 451, "height": 300},
        {"id": 9, "file_name": "coffee.png", "width": 600, "height": 400},
    ]
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 18, "bbox": [100, 20, 300, 270], "area": 81000, "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 47, "bbox": [150, 50, 300, 300], "area": 90000, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": 10, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
    ]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    out, detections = tmp_path / "results" / "metrics.json", tmp_path / "detections.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gdino",
            "eval",
            "coco",
            "--images",
            str(data_dir),
            "--annotations",
            str(instances),
            "--model",
            str(fast_dir),
            "--out",
            str(out),
            "--detections",
            str(detections),
            "--max-dets",
            "20",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 12 and all(line.lstrip().startswith(("Average Precision", "Average Recall")) for line in lines)
    assert "eval 2/2 images" in run.stderr
    report = json.loads(out.read_text())
    assert list(report["metrics"]) == list(METRICS)
    assert report["stats"] == [report["metrics"][m] for m in METRICS]
    assert report["images"] == 2 and report["failed"] == [] and report["max_dets"] == 20

    found = json.loads(detections.read_text())
    assert sorted({d["image_id"] for d in found}) == [5, 9]
    assert all(sum(d["image_id"] == i for d in found) == 20 for i in (5, 9))
    assert {d["category_id"] for d in found} <= {10, 18, 47}

    # the printed numbers are pycocotools' on the written detections
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = COCO(str(instances))
    check = COCOeval(truth, truth.loadRes(str(detections)), "bbox")
    check.evaluate()
    check.accumulate()
    check.summarize()
    np.testing.assert_allclose(report["stats"], check.stats, atol=1e-12)

    # the detections are the protocol's: the 20 best (query, category) pairs by mean token probability
    model = GroundingDinoForObjectDetection.from_pretrained(fast_dir).eval()
    image = Image.open(data_dir / "coffee.png").convert("RGB")
    with torch.inference_mode():
        inputs = model.processor(images=image, text="traffic light. dog. cup.")  # categories by id
        raw = model(**inputs)
    ids = inputs["input_ids"][0].tolist()
    assert ids[1:-1] == [4026, 2422, 1012, 3899, 1012, 2452, 1012]
    probs = raw.logits[0].sigmoid()
    scores = torch.stack([probs[:, 1:3].mean(-1), probs[:, 4], probs[:, 6]], -1)  # (Q, 3)
    best = scores.flatten().topk(20)
    mine = [d for d in found if d["image_id"] == 9]
    np.testing.assert_allclose([d["score"] for d in mine], best.values.numpy(), atol=2e-6)
    assert [d["category_id"] for d in mine] == [(10, 18, 47)[i] for i in (best.indices % 3).tolist()]
    query = best.indices // 3
    cx, cy, w, h = (raw.pred_boxes[0][query] * torch.tensor([600, 400, 600, 400])).unbind(-1)
    np.testing.assert_allclose(
        [d["bbox"] for d in mine], torch.stack([cx - w / 2, cy - h / 2, w, h], -1).numpy(), atol=0.02
    )


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_command_bad_input(tmp_path, fast_dir):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gdino",
            "eval",
            "coco",
            "--images",
            str(tmp_path),
            "--annotations",
            str(tmp_path / "nope.json"),
            "--model",
            str(fast_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("gdino: error: annotation file not found")
