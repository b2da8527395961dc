"""The export formats, read back with their usual readers; values worked out by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from PIL import Image

from gdino.apps.exports import coco_dataset, export, jsonl, yolo_labels

CLASSES = ["cat", 'dog: "the good one"']
RECORDS = [
    {
        "image": "a.png",
        "width": 200,
        "height": 100,
        "detections": [
            {"box": [20.0, 10.0, 60.0, 50.0], "score": 0.9, "label": "dog", "label_id": 1},
            {"box": [-10.0, -5.0, 30.0, 20.0], "score": 0.8, "label": "cat", "label_id": 0},  # clipped
            {"box": [190.4, 40.0, 250.0, 60.6], "score": 0.7, "label": "cat", "label_id": 0},  # clipped on the right
        ],
    },
    {"image": "sub/b.jpg", "width": 50, "height": 40, "detections": []},
    {
        "image": "sub/c.png",
        "width": 50,
        "height": 40,
        "detections": [
            {"box": [10.0, 10.0, 10.0, 30.0], "score": 0.6, "label": "cat", "label_id": 0},  # no width: dropped
            {"box": [0.0, 0.0, 50.0, 40.0], "score": 0.5, "label": "dog", "label_id": 1},
        ],
    },
]


@pytest.fixture()
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    for record in RECORDS:
        path = root / record["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (record["width"], record["height"])).save(path)
    return root


def test_coco_loads_in_pycocotools(tmp_path, image_root):
    from pycocotools.coco import COCO

    (path,) = export(RECORDS, CLASSES, "coco", tmp_path / "out", image_root)
    assert path == tmp_path / "out" / "annotations.json"
    coco = COCO(str(path))
    assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [(1, CLASSES[0]), (2, CLASSES[1])]
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in images] == [
        (1, "a.png", 200, 100),
        (2, "sub/b.jpg", 50, 40),
        (3, "sub/c.png", 50, 40),
    ]
    anns = coco.loadAnns(coco.getAnnIds())
    got = [(a["image_id"], a["category_id"], a["bbox"], a["area"], a["score"]) for a in anns]
    assert got == [
        (1, 2, [20.0, 10.0, 40.0, 40.0], 1600.0, 0.9),
        (1, 1, [0.0, 0.0, 30.0, 20.0], 600.0, 0.8),
        (1, 1, [190.4, 40.0, 9.6, 20.6], 197.76, 0.7),
        (3, 2, [0.0, 0.0, 50.0, 40.0], 2000.0, 0.5),
    ]
    assert all(a["iscrowd"] == 0 for a in anns)
    assert len({a["id"] for a in anns}) == 4
    assert coco.getAnnIds(imgIds=[2]) == []
    assert json.loads(path.read_text()) == coco_dataset(RECORDS, CLASSES)


def test_yolo_as_ultralytics_reads_it(tmp_path, image_root):
    out = tmp_path / "out"
    export(RECORDS, CLASSES, "yolo", out, image_root)
    assert (out / "labels" / "a.txt").read_text() == (
        "1 0.200000 0.300000 0.200000 0.400000\n"  # centre (40, 30), 40 x 40 of 200 x 100
        "0 0.075000 0.100000 0.150000 0.200000\n"  # clipped to (0, 0, 30, 20)
        "0 0.976000 0.503000 0.048000 0.206000\n"  # clipped to (190.4, 40, 200, 60.6)
    )
    assert (out / "labels" / "sub" / "b.txt").read_text() == ""
    assert (out / "labels" / "sub" / "c.txt").read_text() == "1 0.500000 0.500000 1.000000 1.000000\n"
    assert (out / "classes.txt").read_text().splitlines() == CLASSES
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == {0: CLASSES[0], 1: CLASSES[1]} and data["nc"] == 2
    root = Path(data["path"])
    assert root == out.resolve()
    # Ultralytics lists the image files under path/train and swaps /images/ for /labels/ to find labels
    listed = sorted(os.path.join(folder, f) for folder, _, files in os.walk(root / data["train"]) for f in files)
    assert len(listed) == 3
    for image in listed:
        label = "/labels/".join(image.rsplit("/images/", 1)).rsplit(".", 1)[0] + ".txt"
        assert os.path.isfile(label), label
        relative = Path(image).relative_to(root / "images")
        assert Path(image).read_bytes() == (image_root / relative).read_bytes()
        with Image.open(image) as im:
            assert im.size[0] > 0
    for line in (out / "labels" / "a.txt").read_text().splitlines():
        cls, *xywh = line.split()
        assert int(cls) in data["names"] and all(0 <= float(v) <= 1 for v in xywh)


def test_voc_xml(tmp_path, image_root):
    out = tmp_path / "out"
    files = export(RECORDS, CLASSES, "voc", out, image_root)
    assert [f.relative_to(out).as_posix() for f in files] == [
        "Annotations/a.xml",
        "Annotations/sub/b.xml",
        "Annotations/sub/c.xml",
    ]
    root = ElementTree.parse(out / "Annotations" / "a.xml").getroot()
    assert root.tag == "annotation"
    assert root.findtext("filename") == "a.png"
    assert root.findtext("folder") == "images"
    assert Path(root.findtext("path")) == (image_root / "a.png").resolve()
    assert [root.findtext(f"size/{k}") for k in ("width", "height", "depth")] == ["200", "100", "3"]
    objects = [
        (
            o.findtext("name"),
            o.findtext("truncated"),
            o.findtext("difficult"),
            [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")],
        )
        for o in root.iter("object")
    ]
    assert objects == [
        (CLASSES[1], "0", "0", [20, 10, 60, 50]),
        (CLASSES[0], "1", "0", [0, 0, 30, 20]),
        (CLASSES[0], "1", "0", [190, 40, 200, 61]),
    ]
    empty = ElementTree.parse(out / "Annotations" / "sub" / "b.xml").getroot()
    assert empty.findtext("filename") == "b.jpg" and empty.find("object") is None


def test_jsonl_round_trip(tmp_path, image_root):
    (path,) = export(RECORDS, CLASSES, "jsonl", tmp_path / "out", image_root)
    assert [json.loads(line) for line in path.read_text().splitlines()] == RECORDS
    assert path.read_text() == jsonl(RECORDS)


def test_same_stem_is_reported_not_overwritten(tmp_path, image_root):
    twin = {**RECORDS[1], "image": "sub/b.png", "detections": RECORDS[2]["detections"]}
    Image.new("RGB", (50, 40)).save(image_root / "sub" / "b.png")
    warnings = []
    export([RECORDS[1], twin], CLASSES, "yolo", tmp_path / "out", image_root, warn=warnings.append)
    assert (tmp_path / "out" / "labels" / "sub" / "b.txt").read_text() == ""  # the first one's
    assert len(warnings) == 1 and "sub/b.png" in warnings[0]


def test_unknown_format(tmp_path, image_root):
    with pytest.raises(ValueError, match="coco, yolo, voc, jsonl"):
        export(RECORDS, CLASSES, "csv", tmp_path, image_root)


def test_yolo_lines_by_hand():
    record = {"width": 10, "height": 20, "detections": [{"box": [1, 2, 3, 6], "score": 1.0, "label_id": 3}]}
    assert yolo_labels(record) == "3 0.200000 0.200000 0.200000 0.200000\n"
