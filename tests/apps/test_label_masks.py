"""``gdino label --masks``: every export format with masks, read back with its usual reader (pycocotools,
gdino's YOLO reader, PIL for VOC's PNGs), re-exported from the journal without either model, and the
kill/resume run byte for byte. Masks come from the ellipse stand-in (``tests/ellipse_segmenter.py``)
except in the one test that runs the real segmenter on a tiny random SAM 2.1."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools", reason="the masks extra is not installed: pip install -e '.[masks]'")
pytest.importorskip("cv2", reason="the masks extra is not installed: pip install -e '.[masks]'")
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ellipse_segmenter import EllipseSegmenter, ellipse
from gdino.apps.exports import export
from gdino.apps.label import LabelError, Settings, label_folder
from gdino.apps.mask_exports import join_parts, voc_palette
from gdino.inference.detections import Detections
from gdino.inference.masks import Masks
from gdino.training.yolo import read_objects, read_yolo

CLASSES = ("blob", "thing")
SETTINGS = Settings(CLASSES, "fake-detector", 0.3, None, masks="fake-segmenter")
SIZES = [(64, 48), (50, 70), (80, 80)]


def boxes_of(width: int, height: int) -> np.ndarray:
    """Three boxes per image: two that overlap, one that leaves the image (clipped)."""
    return np.array(
        [
            [0.1 * width, 0.1 * height, 0.55 * width, 0.6 * height],
            [0.4 * width, 0.3 * height, 0.95 * width, 0.9 * height],
            [-5.0, 0.7 * height, 0.3 * width, height + 5.0],
        ],
        np.float32,
    )


def fake_detect(images: list[Image.Image]) -> list[Detections]:
    """Boxes from ``boxes_of``, best first, masks from the ellipse stand-in."""
    segmenter = EllipseSegmenter()
    found = []
    for image in images:
        boxes = boxes_of(*image.size)
        det = Detections(
            boxes, np.array([0.9, 0.8, 0.7], np.float32), ("blob", "thing", "blob"), np.array([0, 1, 0]), image.size
        )
        found.append(segmenter.add_masks(image, det))
    return found


def no_model():
    raise AssertionError("every image is in the journal: neither model is needed")


@pytest.fixture()
def folder(tmp_path) -> Path:
    root = tmp_path / "shapes"
    for i, size in enumerate(SIZES):
        path = root / ("sub" if i == 2 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (40 * i, 90, 160)).save(path)
    return root


def labelled(folder: Path, out: Path, fmt: str, make=lambda: fake_detect, **options) -> None:
    summary = label_folder(folder, out, fmt, SETTINGS, make, batch_size=2, log=io.StringIO(), **options)
    assert (summary.images, summary.errors, summary.boxes) == (3, 0, 9)


def truth(name: str, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) the stand-in's masks of the image."""
    return np.stack([ellipse(box, *size) for box in boxes_of(*size)])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# --------------------------------------------------------------------------- each format


@pytest.mark.parametrize("mask_format", ["polygon", "rle"])
def test_coco_masks_load_in_pycocotools(folder, tmp_path, mask_format):
    out = tmp_path / "out"
    labelled(folder, out, "coco", mask_format=mask_format)
    coco = COCO(str(out / "annotations.json"))
    images = coco.loadImgs(coco.getImgIds())
    assert [i["file_name"] for i in images] == ["img0.png", "img1.png", "sub/img2.png"]
    for info in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        want = truth(info["file_name"], (info["width"], info["height"]))
        assert [a["category_id"] for a in anns] == [1, 2, 1]
        for ann, mask in zip(anns, want):
            got = coco.annToMask(ann).astype(bool)
            assert got.shape == mask.shape
            np.testing.assert_array_equal(got, mask)  # polygons rasterise back to the very pixels
            assert ann["area"] == int(mask.sum()) and ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"], list if mask_format == "polygon" else dict)
            assert 0.5 < ann["mask_score"] < 1.0


def test_yolo_segment_lines_read_back(folder, tmp_path):
    out = tmp_path / "out"
    labelled(folder, out, "yolo")
    data = read_yolo(out)
    assert data.names == CLASSES and not data.problems
    for sample in data.samples:
        width, height = sample.width, sample.height
        label_file = out / "labels" / sample.image.relative_to(out / "images").with_suffix(".txt")
        lines = label_file.read_text().splitlines()
        assert len(lines) == 3 and all(len(line.split()) >= 7 and len(line.split()) % 2 == 1 for line in lines)
        objects, errors = read_objects(label_file, len(CLASSES), width, height)
        assert errors == [] and [o.label for o in objects] == [0, 1, 0] == list(sample.labels)
        want = truth(sample.image.name, (width, height))
        for obj, mask, box in zip(objects, want, sample.boxes):
            assert obj.polygon is not None
            drawn = _fill(obj.polygon, width, height)
            assert iou(drawn, mask) > 0.95
            ys, xs = np.nonzero(mask)  # the box is the polygon's bounds: the mask's, within a pixel
            np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.0)


def _fill(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) bool: pycocotools' rasterisation of a pixel polygon (K, 2)."""
    rles = mask_utils.frPyObjects([polygon.reshape(-1).astype(np.float64).tolist()], height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_a_mask_in_two_parts_is_one_joined_polygon(tmp_path):
    """Two blobs of one object: one YOLO line whose polygon covers both (IoU > 0.95 with the mask)."""
    width, height = 90, 60
    mask = np.zeros((height, width), bool)
    mask[5:25, 5:30] = True
    mask[30:55, 50:85] = ellipse(np.array([50, 30, 85, 55]), width, height)[30:55, 50:85]
    rle = Masks.from_dense(mask[None]).to_rle()[0]
    record = {
        "image": "two.png",
        "width": width,
        "height": height,
        "detections": [{"box": [5, 5, 85, 55], "score": 0.9, "label": "blob", "label_id": 0, "mask": rle}],
    }
    Image.new("RGB", (width, height)).save(tmp_path / "two.png")
    export([record], CLASSES, "yolo", tmp_path / "out", tmp_path)
    label_file = tmp_path / "out" / "labels" / "two.txt"
    assert len(label_file.read_text().splitlines()) == 1
    (obj,), _ = read_objects(label_file, 2, width, height)
    assert obj.polygon is not None and iou(_fill(obj.polygon, width, height), mask) > 0.95
    np.testing.assert_allclose(obj.box, [5, 5, 85, 55], atol=0.5)


def test_an_empty_mask_keeps_its_box(tmp_path):
    """A detection whose mask came out empty: COCO keeps its RLE (pycocotools cannot read an empty
    polygon list), YOLO writes no line for it (a box line would be misread among polygons), VOC
    keeps the object in the XML and paints nothing."""
    width, height = 40, 30
    full = np.zeros((2, height, width), bool)
    full[0, 5:20, 5:25] = True
    rles = Masks.from_dense(full).to_rle()
    record = {
        "image": "e.png",
        "width": width,
        "height": height,
        "detections": [
            {"box": [5, 5, 25, 20], "score": 0.9, "label": "blob", "label_id": 0, "mask": rles[0], "mask_score": 0.8},
            {
                "box": [20, 10, 35, 28],
                "score": 0.5,
                "label": "thing",
                "label_id": 1,
                "mask": rles[1],
                "mask_score": 0.1,
            },
        ],
    }
    Image.new("RGB", (width, height)).save(tmp_path / "e.png")
    for fmt in ("coco", "yolo", "voc"):
        export([record], CLASSES, fmt, tmp_path / "out", tmp_path)
    coco = COCO(str(tmp_path / "out" / "annotations.json"))
    first, empty = coco.loadAnns(coco.getAnnIds())
    assert isinstance(first["segmentation"], list) and first["area"] == 300
    assert empty["segmentation"] == rles[1] and empty["area"] == 0 and empty["bbox"] == [20, 10, 15, 18]
    assert coco.annToMask(empty).sum() == 0
    (line,) = (tmp_path / "out" / "labels" / "e.txt").read_text().splitlines()
    assert line.startswith("0 ")
    assert len(ElementTree.parse(tmp_path / "out" / "Annotations" / "e.xml").getroot().findall("object")) == 2
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "SegmentationClass" / "e.png")), full[0])


def test_bad_polygon_lines_are_reported(tmp_path):
    label_file = tmp_path / "a.txt"
    label_file.write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n1 0.1 0.1 0.5 0.1 0.5 0.5 0.2\n0 0.1 0.1 0.2 0.1 0.2 inf\n")
    objects, errors = read_objects(label_file, 2, 100, 50)
    assert len(objects) == 1 and objects[0].box == pytest.approx((10.0, 5.0, 50.0, 25.0))
    np.testing.assert_allclose(objects[0].polygon, [[10, 5], [50, 5], [50, 25]])
    assert [n for n, _ in errors] == [2, 3]
    assert "got 8 fields (or a polygon" in errors[0][1] and "not finite" in errors[1][1]


def test_join_parts_walks_each_part_and_back():
    square = [0, 0, 2, 0, 2, 2, 0, 2]
    far = [10, 0, 12, 0, 12, 2, 10, 2]
    joined = np.array(join_parts([square, far])).reshape(-1, 2)
    # entered at (2, 0), the square's point nearest the other part; its nearest is (10, 0)
    assert joined.tolist() == [
        [2, 0],
        [10, 0],
        [12, 0],
        [12, 2],
        [10, 2],
        [10, 0],
        [2, 0],
        [2, 2],
        [0, 2],
        [0, 0],
        [2, 0],
    ]  # fmt: skip (one point a pair reads as the walk)
    assert join_parts([square]) == [float(v) for v in square]


def test_voc_segmentation_pngs(folder, tmp_path):
    out = tmp_path / "out"
    labelled(folder, out, "voc")
    palette = voc_palette()
    assert palette[3:6] == [128, 0, 0] and palette[6:9] == [0, 128, 0] and palette[-3:] == [224, 224, 192]
    for i, (width, height) in enumerate(SIZES):
        name = ("sub/" if i == 2 else "") + f"img{i}"
        xml = ElementTree.parse(out / "Annotations" / f"{name}.xml").getroot()
        assert xml.findtext("segmented") == "1" and len(xml.findall("object")) == 3
        objects = Image.open(out / "SegmentationObject" / f"{name}.png")
        classes = Image.open(out / "SegmentationClass" / f"{name}.png")
        assert objects.mode == classes.mode == "P" and objects.size == (width, height)
        assert objects.getpalette()[:9] == palette[:9]
        index, cls = np.asarray(objects), np.asarray(classes)
        a, b, c = truth(name, (width, height))
        expected = np.where(a, 1, np.where(b, 2, np.where(c, 3, 0)))  # the better-scored object on top
        np.testing.assert_array_equal(index, expected)
        np.testing.assert_array_equal(cls, np.array([0, 1, 2, 1])[expected])


def test_jsonl_keeps_the_rle(folder, tmp_path):
    out = tmp_path / "out"
    labelled(folder, out, "jsonl")
    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    for record in records:
        want = truth(record["image"], (record["width"], record["height"]))
        for det, mask in zip(record["detections"], want):
            assert det["mask"]["size"] == [record["height"], record["width"]]
            np.testing.assert_array_equal(
                mask_utils.decode({**det["mask"], "counts": det["mask"]["counts"].encode()}), mask
            )


def test_every_format_again_from_the_journal_without_a_model(folder, tmp_path):
    out = tmp_path / "out"
    labelled(folder, out, "jsonl")
    for fmt in ("coco", "yolo", "voc"):
        labelled(folder, out, fmt, make=no_model)
    assert len(list((out / "SegmentationObject").rglob("*.png"))) == 3
    assert len(list((out / "labels").rglob("*.txt"))) == 3


def test_masks_or_not_is_a_setting_of_the_run(folder, tmp_path):
    out = tmp_path / "out"
    labelled(folder, out, "coco")
    boxes_only = Settings(CLASSES, "fake-detector", 0.3, None)
    with pytest.raises(LabelError, match=r"other settings.*masks: fake-segmenter -> None"):
        label_folder(folder, out, "coco", boxes_only, no_model, log=io.StringIO())


def test_a_run_without_masks_keeps_its_old_header(tmp_path):
    from gdino.apps.label import Journal

    journal = Journal(tmp_path / "j.jsonl", Settings(CLASSES, "m", 0.3, None))
    journal.close()
    header = json.loads((tmp_path / "j.jsonl").read_text().splitlines()[0])
    assert "masks" not in header and header["classes"] == list(CLASSES)


# --------------------------------------------------------------------------- the command


def label_main(capsys, *args: str | Path) -> tuple[int, str]:
    from gdino.apps.cli import main

    try:
        status = main(["label", *map(str, args)])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--masks", "--ray"], "--masks does not run on Ray"),
        (["--mask-format", "rle"], "--mask-format says how to write masks: give it with --masks"),
    ],
)
def test_refused_in_one_line_before_any_work(folder, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    status, err = label_main(capsys, folder, "--classes", "blob", "--out", out, "--model", tmp_path / "none", *extra)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdino: error:") and needle in lines[0], err
    assert not out.exists()


RUNNER = """import sys
sys.path.insert(0, {tests!r})
from ellipse_segmenter import EllipseSegmenter
from gdino.apps import masking
masking._load = lambda name, device, dtype: EllipseSegmenter()  # --masks loads the stand-in
from gdino.apps.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a killed subprocess run with the small model, then two more
def test_killed_and_started_again_equals_one_run_with_masks(data_dir, fast_dir, tmp_path):
    from test_label import _journal_lines, _tree, make_photos

    (tmp_path / "photos").mkdir()
    folder = make_photos(tmp_path / "photos", data_dir)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(tests=str(Path(__file__).parents[1])))
    common = ["--classes", "cat,remote control,rocket", "--model", str(fast_dir), "--box-threshold", "0.3"]
    common += ["--device", "cpu", "--batch-size", "2", "--masks", "stand-in"]

    def gdino(fmt: str, out: Path, background: bool = False):
        command = [sys.executable, str(runner), "label", str(folder), "--format", fmt, "--out", str(out), *common]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if background:
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)

    reference, out = tmp_path / "reference", tmp_path / "out"
    whole = gdino("coco", reference)
    assert whole.returncode == 0, whole.stderr
    run = gdino("coco", out, background=True)
    journal = out / ".gdino-label.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 7:  # header and three batches
            break
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(_journal_lines(journal)) - 1
    assert 6 <= done < 31 and not (out / "annotations.json").exists()
    again = gdino("coco", out)
    assert again.returncode == 0, again.stderr and "resuming" in again.stderr
    records = [r for r in _journal_lines(journal)[1:] if "error" not in r]
    masks = [d["mask"] for r in records for d in r["detections"]]
    assert len(records) == 30 and masks and all(set(m) == {"size", "counts"} for m in masks)
    assert _tree(out) == _tree(reference)
    coco = COCO(str(out / "annotations.json"))
    assert all(coco.annToMask(a).sum() == a["area"] > 0 for a in coco.loadAnns(coco.getAnnIds()))
    settings = Settings(("cat", "remote control", "rocket"), str(fast_dir), 0.3, None, masks="stand-in")
    for fmt in ("yolo", "voc", "jsonl"):  # from the journals, byte for byte, without either model
        for target in (out, reference):
            summary = label_folder(folder, target, fmt, settings, no_model, log=io.StringIO())
            assert (summary.images, summary.resumed, summary.errors) == (31, 30, 1)
        same = [{k: v for k, v in _tree(t).items() if k != "data.yaml"} for t in (out, reference)]  # its own path
        assert same[0] == same[1], fmt
    assert len(list((out / "SegmentationClass").rglob("*.png"))) == 30


@pytest.mark.slow  # the small detector and a tiny SAM 2.1 in this process
def test_the_real_segmenter_on_a_tiny_random_sam2(data_dir, fast_dir, fast_model, tmp_path, capsys):
    """``--masks DIR`` with a seeded random SAM 2.1 (Hugging Face layout): the journal's masks are the
    Segmenter's own for the detector's boxes, and the COCO RLE export gives them back."""
    import math
    from dataclasses import replace

    import torch
    from safetensors.torch import save_file

    from gdino.checkpoint.convert_sam2 import ours_to_hf
    from gdino.inference.segmenter import Segmenter
    from gdino.models.sam2.config import Sam2Config
    from gdino.models.sam2.model import Sam2

    torch.manual_seed(0)
    config = replace(Sam2Config.shapes(), image_size=128)
    model = Sam2(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # seeded noise, so that the random model's masks are not degenerate
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() < 2 else 1 / math.sqrt(p[0].numel())))
    sam2 = tmp_path / "sam2"
    sam2.mkdir()
    save_file(
        {k: v.clone().contiguous() for k, v in ours_to_hf(model.state_dict()).items()}, str(sam2 / "model.safetensors")
    )
    (sam2 / "config.json").write_text(json.dumps(config.to_hf_dict()))

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(data_dir / "coffee.png").resize((120, 80)).save(photos / "coffee.png")
    out = tmp_path / "out"
    common = ["--classes", "cup,rocket", "--model", fast_dir, "--box-threshold", "0.2", "--device", "cpu"]
    status, err = label_main(capsys, photos, *common, "--out", out, "--masks", sam2, "--format", "coco")
    assert status == 0, err
    status, err = label_main(capsys, photos, *common, "--out", out, "--masks", sam2, "--mask-format", "rle")
    assert status == 0 and "resuming, 1 of 1" in err, err

    picture = Image.open(photos / "coffee.png").convert("RGB")
    found = fast_model.detect(picture, ["cup", "rocket"], box_threshold=0.2)
    masks, scores = Segmenter.from_pretrained(sam2).segment(picture, found.boxes)
    assert len(found) > 0 and masks.areas().sum() > 0
    (record,) = [json.loads(line) for line in (out / ".gdino-label.jsonl").read_text().splitlines()[1:]]
    assert [d["mask"] for d in record["detections"]] == masks.to_rle()
    np.testing.assert_allclose([d["mask_score"] for d in record["detections"]], scores, atol=1e-4)
    coco = COCO(str(out / "annotations.json"))
    anns = coco.loadAnns(coco.getAnnIds())
    kept = [m for m, box in zip(masks.dense(), found.boxes) if box[2] > box[0] and box[3] > box[1]]
    assert len(anns) == len(kept)
    for ann, mask in zip(anns, kept):
        np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
