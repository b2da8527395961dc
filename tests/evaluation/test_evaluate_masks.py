"""``gdino eval coco --masks``: pycocotools' ``segm`` summary beside ``bbox``, on a generated set whose
answer is known.

Two 200x200 images. "blob" (id 1): three objects whose true masks are the ellipses inscribed in their
boxes; "brick" (id 2): one object whose true mask is its whole box. The detector finds every box
exactly (bbox AP 1), and the brick's box once more as a low-scored "blob" (a false positive after
every blob found: AP stays 1). The stand-in segmenter gives each box its ellipse: the blobs' masks
are exact (IoU 1), the brick's covers pi/4 of its box (IoU 0.785): found at IoU 0.50 ... 0.75 (6 of
the 10 thresholds), missed at 0.80 ... 0.95. segm AP = (1 + 6/10) / 2 = 0.8, AP50 = AP75 = 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools", reason="the masks extra is not installed: pip install -e '.[masks]'")
from ellipse_segmenter import EllipseSegmenter, ellipse
from gdino.evaluation.coco import METRICS, EvalError, evaluate_coco
from gdino.inference.masks import Masks

SIZE = 200
BLOBS = {"a.png": [(10, 10, 70, 50), (100, 120, 180, 190)], "b.png": [(20, 100, 90, 160)]}  # x0 y0 x1 y1
BRICK = ("b.png", (110, 20, 170, 60))


def _polygons(box: tuple[int, int, int, int]) -> list[list[float]]:
    return Masks.from_dense(ellipse(np.array(box), SIZE, SIZE)[None]).polygons(0)


@pytest.fixture()
def dataset(tmp_path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    entries, annotations = [], []
    for image_id, name in enumerate(["a.png", "b.png"], start=1):
        entries.append({"id": image_id, "file_name": name, "width": SIZE, "height": SIZE})
        Image.new("RGB", (SIZE, SIZE), (90, 120, 150)).save(images / name)
        objects = [(1, box, _polygons(box)) for box in BLOBS[name]]
        if name == BRICK[0]:
            x0, y0, x1, y1 = BRICK[1]
            objects.append((2, BRICK[1], [[x0, y0, x1, y0, x1, y1, x0, y1]]))
        for category, (x0, y0, x1, y1), segmentation in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": segmentation,
                }
            )
    categories = [{"id": 1, "name": "blob"}, {"id": 2, "name": "brick"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return images, path


def _detector(names: list[str]):
    assert names == ["blob", "brick"]

    def detect(image: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        found = [(box, 0.9 - 0.1 * i, 0) for i, box in enumerate(BLOBS[info["file_name"]])]
        if info["file_name"] == BRICK[0]:
            found += [(BRICK[1], 0.95, 1), (BRICK[1], 0.1, 0)]  # the same box for both categories
        return (
            np.array([f[0] for f in found], np.float32),
            np.array([f[1] for f in found]),
            np.array([f[2] for f in found]),
        )

    return detect


def _segmenter(calls: list[int]):
    stand_in = EllipseSegmenter()

    def segment(image: np.ndarray, boxes: np.ndarray) -> list[dict]:
        calls.append(len(boxes))
        masks, _ = stand_in.segment(Image.fromarray(image), boxes)
        return masks.to_rle()

    return lambda: segment


def test_segm_summary_known_answer(dataset):
    images, annotations = dataset
    calls: list[int] = []
    result = evaluate_coco(images, annotations, _detector, make_segmenter=_segmenter(calls))
    assert calls == [2, 2]  # image b: the brick's box segmented once for its two categories
    assert result.metrics["AP"] == pytest.approx(1.0) and result.metrics["AP50"] == pytest.approx(1.0)
    assert result.mask_metrics is not None and list(result.mask_metrics) == list(METRICS)
    assert result.mask_metrics["AP"] == pytest.approx(0.8, abs=1e-9)
    assert result.mask_metrics["AP50"] == pytest.approx(1.0) and result.mask_metrics["AP75"] == pytest.approx(1.0)
    assert result.mask_metrics["AR100"] == pytest.approx(0.8, abs=1e-9)  # recall 1 and 6/10, as AP
    assert len(result.mask_table.strip().splitlines()) == 12
    assert all("segmentation" in r and set(r["segmentation"]) == {"size", "counts"} for r in result.results)
    brick = [r for r in result.results if r["image_id"] == 2 and r["bbox"] == [110.0, 20.0, 60.0, 40.0]]
    assert len(brick) == 2 and brick[0]["segmentation"] == brick[1]["segmentation"]


def test_without_a_segmenter_nothing_changes(dataset):
    images, annotations = dataset
    result = evaluate_coco(images, annotations, _detector)
    assert result.mask_metrics is None and result.mask_table == ""
    assert not any("segmentation" in r for r in result.results)


def test_annotations_without_segmentation_are_refused_before_the_model(dataset):
    images, annotations = dataset
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    annotations.write_text(json.dumps(data))

    def never(names):
        raise AssertionError("the detector is not made")

    with pytest.raises(EvalError, match="no segmentation to score masks against"):
        evaluate_coco(images, annotations, never, make_segmenter=_segmenter([]))


def test_command_refuses_masks_without_segmentation_in_one_line(dataset, tmp_path, capsys):
    from gdino.apps.cli import main

    images, annotations = dataset
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    annotations.write_text(json.dumps(data))
    args = ["--images", str(images), "--annotations", str(annotations), "--model", str(tmp_path / "no-model")]
    status = main(["eval", "coco", *args, "--masks", "stand-in", "--device", "cpu"])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    lines = [line for line in captured.err.strip().splitlines() if line.startswith("gdino:")]
    assert lines == [f"gdino: error: {annotations} has no segmentation to score masks against; leave out --masks"]


@pytest.mark.slow  # loads the small detector in this process
def test_command_prints_and_writes_both(dataset, fast_dir, tmp_path, monkeypatch, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from gdino.apps import masking
    from gdino.apps.cli import main

    class ArrayStandIn(EllipseSegmenter):  # eval hands the segmenter (H, W, 3) arrays
        def segment(self, image, boxes):
            return super().segment(Image.fromarray(image), boxes)

    monkeypatch.setattr(masking, "_load", lambda name, device, dtype: ArrayStandIn())
    images, annotations = dataset
    out, detections = tmp_path / "metrics.json", tmp_path / "detections.json"
    inputs = ["--images", str(images), "--annotations", str(annotations), "--model", str(fast_dir)]
    outputs = ["--max-dets", "20", "--out", str(out), "--detections", str(detections)]
    status = main(["eval", "coco", *inputs, "--masks", "stand-in", *outputs])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0] == "bbox:" and lines[13] == "segm:" and len(lines) == 26
    report = json.loads(out.read_text())
    assert report["masks"] == "stand-in" and len(report["segm"]["stats"]) == 12
    truth = COCO(str(annotations))
    found = json.loads(detections.read_text())
    assert len(found) == 40, captured.err
    assert all("segmentation" in d for d in found)
    check = COCOeval(truth, truth.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in found]), "segm")
    check.evaluate()
    check.accumulate()
    check.summarize()
    np.testing.assert_allclose(report["segm"]["stats"], check.stats, atol=1e-12)
