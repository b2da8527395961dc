"""Training data readers: COCO, ODVG and YOLO into one sample type; bad records reported and skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdino.apps.exports import clipped_boxes, export
from gdino.training.datasets import DataError, read_coco, read_dataset, read_odvg, read_yolo


def _image(path: Path, width: int, height: int, colour: tuple[int, int, int] = (90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), colour).save(path)
    return path


# --------------------------------------------------------------------------- COCO


@pytest.fixture()
def coco_file(tmp_path) -> Path:
    _image(tmp_path / "img" / "a.png", 100, 80)
    _image(tmp_path / "img" / "b.png", 60, 40)
    _image(tmp_path / "img" / "c.png", 50, 50)
    _image(tmp_path / "img" / "d.png", 50, 50)
    _image(tmp_path / "img" / "e.png", 30, 20)
    (tmp_path / "img" / "broken.png").write_bytes(b"not an image")
    data = {
        "categories": [{"id": 90, "name": "zebra"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "images": [
            {"id": 10, "file_name": "a.png", "width": 100, "height": 80},
            {"id": 11, "file_name": "b.png", "width": 60, "height": 40},
            {"id": 12, "file_name": "c.png", "width": 50, "height": 50},  # box outside
            {"id": 13, "file_name": "d.png", "width": 50, "height": 50},  # unknown category
            {"id": 14, "file_name": "broken.png", "width": 50, "height": 50},  # unreadable
            {"id": 15, "file_name": "missing.png", "width": 50, "height": 50},  # not there
            {"id": 16, "file_name": "e.png", "width": 31, "height": 20},  # wrong size
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 90, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 100.5, 80]},  # overshoots 0.5 px: clipped
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1},  # left out
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [40, 40, 20, 5]},
            {"id": 5, "image_id": 13, "category_id": 2, "bbox": [1, 1, 5, 5]},
            {"id": 6, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},
            {"id": 7, "image_id": 11, "category_id": 3, "bbox": [1, 2, 0, 5]},  # empty box
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_names_are_the_categories_by_id_and_ids_map_back_exactly(coco_file):
    data = read_coco(coco_file, coco_file.parent / "img")
    assert data.names == ("cat", "dog", "zebra")
    assert data.ids == (1, 3, 90)
    assert [data.label_of_id(i) for i in (1, 3, 90)] == [0, 1, 2]
    assert len(data) == 1  # a.png; every other image has a bad record
    a = data[0]
    assert a.image.name == "a.png" and (a.width, a.height) == (100, 80) and not a.is_grounding
    assert [data.ids[label] for label in a.labels] == [90, 1]
    np.testing.assert_allclose(a.boxes, [[10, 20, 40, 60], [0, 0, 100, 80]])
    assert a.boxes.dtype == np.float32


def test_coco_bad_records_are_reported_with_file_and_record(coco_file):
    data = read_coco(coco_file, coco_file.parent / "img")
    text = [str(p) for p in data.problems]
    assert len(text) == 7, text
    assert all(t.startswith(str(coco_file) + ": ") for t in text)
    joined = "\n".join(text)
    assert "annotations[3] (id 4): box x0,y0,x1,y1 = 40,40,60,45 is outside the 50x50 image" in joined
    assert "annotations[4] (id 5): unknown category_id 2; image 'd.png' skipped" in joined
    assert "annotations[5] (id 6): image_id 99 is not in 'images'" in joined
    assert "annotations[6] (id 7): box x0,y0,x1,y1 = 1,2,1,7 is empty" in joined
    assert "image id 14 (broken.png): cannot read" in joined
    assert "image id 15 (missing.png): image file not found" in joined
    assert "image id 16 (e.png):" in joined and "is 30x20 but the annotations say 31x20" in joined
    report = data.report()
    assert "1 images; 7 bad records skipped:" in report and "annotations[3] (id 4)" in report


def test_coco_unreadable_file_is_one_clear_error(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*x.json as JSON"):
        read_coco(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="not a COCO detection file"):
        read_coco(tmp_path / "y.json")


# --------------------------------------------------------------------------- ODVG


@pytest.fixture()
def odvg_file(tmp_path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        _image(tmp_path / name, 64, 48)
    caption = "A man holding a red umbrella next to a man in a hat"
    lines = [
        {
            "filename": "a.jpg",
            "height": 48,
            "width": 64,
            "detection": {
                "instances": [
                    {"bbox": [1, 2, 30, 40], "label": 5, "category": "car"},
                    {"bbox": [10, 10, 20, 20], "label": 0, "category": "person"},
                ]
            },
        },
        {
            "filename": "b.jpg",
            "height": 48,
            "width": 64,
            "grounding": {
                "caption": caption,
                "regions": [
                    {"bbox": [0, 0, 10, 40], "phrase": "a red umbrella"},
                    {"bbox": [20, 0, 40, 48], "phrase": "A man"},
                    {"bbox": [40, 0, 60, 48], "phrase": "a man in a hat", "tokens_positive": [[37, 51]]},
                    {"bbox": [12, 3, 16, 9], "phrase": "a red umbrella"},
                ],
            },
        },
        "{this line is broken",
        {
            "filename": "c.jpg",
            "height": 48,
            "width": 64,
            "detection": {"instances": [{"bbox": [1, 2, 30, 40], "label": 7, "category": "boat"}]},
        },
        {
            "filename": "d.jpg",
            "height": 48,
            "width": 64,
            "detection": {"instances": [{"bbox": [1, 2, 80, 40], "label": 0, "category": "person"}]},
        },
        {
            "filename": "e.jpg",
            "height": 48,
            "width": 64,
            "grounding": {"caption": "a dog", "regions": [{"bbox": [1, 2, 30, 40], "phrase": "a cat"}]},
        },
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_odvg_detection_and_grounding_records(odvg_file):
    data = read_odvg(odvg_file, label_map={"0": "person", "5": "car"})
    assert data.names == ("person", "car") and data.ids == (0, 5)
    assert len(data) == 2
    det, ground = data.samples
    assert det.labels == (1, 0) and not det.is_grounding
    np.testing.assert_allclose(det.boxes, [[1, 2, 30, 40], [10, 10, 20, 20]])
    assert ground.is_grounding and ground.caption.startswith("A man holding")
    # distinct phrases in caption order, each with its span in the caption
    assert [p.text for p in ground.phrases] == ["A man", "a red umbrella", "a man in a hat"]
    assert [ground.caption[s:e] for p in ground.phrases for s, e in p.spans] == [
        "A man",
        "a red umbrella",
        "a man in a hat",
    ]
    assert ground.labels == (1, 0, 2, 1)
    assert ground.origin == f"{odvg_file}: line 2"


def test_odvg_bad_lines_are_reported_by_line(odvg_file):
    data = read_odvg(odvg_file, label_map={"0": "person", "5": "car"})
    text = "\n".join(str(p) for p in data.problems)
    assert len(data.problems) == 4, text
    assert f"{odvg_file}: line 3: not JSON" in text
    assert f"{odvg_file}: line 4: instance 0: unknown label 7 ('boat')" in text
    assert f"{odvg_file}: line 5: instance 0: box x0,y0,x1,y1 = 1,2,80,40 is outside the 64x48 image" in text
    assert f"{odvg_file}: line 6: region 0: phrase 'a cat' is not in the caption 'a dog'" in text


def test_odvg_labels_come_from_the_file_without_a_label_map(odvg_file):
    data = read_odvg(odvg_file)
    assert data.names == ("person", "car", "boat") and data.ids == (0, 5, 7)
    assert len(data) == 3  # the boat image is fine now; the box outside is still bad


# --------------------------------------------------------------------------- YOLO


RECORDS = [
    {
        "image": "a.png",
        "width": 200,
        "height": 100,
        "detections": [
            {"box": [20.0, 10.0, 60.0, 50.0], "score": 0.9, "label": "dog", "label_id": 1},
            {"box": [-10.0, -5.0, 30.0, 20.0], "score": 0.8, "label": "cat", "label_id": 0},
        ],
    },
    {"image": "sub/b.jpg", "width": 50, "height": 40, "detections": []},
]


def test_yolo_folder_written_by_gdino_label_reads_back(tmp_path):
    for record in RECORDS:
        _image(tmp_path / "src" / record["image"], record["width"], record["height"])
    export(RECORDS, ["cat", "dog"], "yolo", tmp_path / "out", tmp_path / "src")
    data = read_dataset(tmp_path / "out")
    assert data.names == ("cat", "dog") and data.ids == (0, 1) and not data.problems
    assert [s.image.relative_to(tmp_path / "out" / "images").as_posix() for s in data.samples] == ["a.png", "sub/b.jpg"]
    a, b = data.samples
    expected = clipped_boxes(RECORDS[0])
    assert a.labels == tuple(e[4] for e in expected)
    np.testing.assert_allclose(a.boxes, [e[:4] for e in expected], atol=1e-3)
    assert len(b.boxes) == 0 and b.labels == ()


def test_yolo_bad_lines_orphans_and_images_are_reported(tmp_path):
    root = tmp_path / "yolo"
    for name in ("a", "b", "c", "d"):
        _image(root / "images" / f"{name}.png", 40, 20)
    (root / "images" / "e.png").write_bytes(b"\x89PNG broken")
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.25 0.5 0.5 1.0\n")
    (root / "labels" / "b.txt").write_text("0 0.5 0.5 0.5 0.5\n2 0.5 0.5 0.1 0.1\n")
    (root / "labels" / "c.txt").write_text("0 0.5 0.5 0.5\n")
    (root / "labels" / "d.txt").write_text("0 0.9 0.5 0.5 0.5\n")
    (root / "labels" / "z.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text('path: "x"\nnames:\n  0: "cat"\n  1: "dog: the good one"\nnc: 2\n')
    data = read_yolo(root)
    assert data.names == ("cat", "dog: the good one")
    assert [s.image.name for s in data.samples] == ["a.png"]
    np.testing.assert_allclose(data[0].boxes, [[10, 5, 30, 15], [0, 0, 20, 20]])
    text = "\n".join(str(p) for p in data.problems)
    assert len(data.problems) == 5, text
    assert f"{root / 'labels' / 'b.txt'}: line 2: class 2 is not in the 2 classes; image skipped" in text
    assert f"{root / 'labels' / 'c.txt'}: line 1: expected 'class cx cy w h', got 4 fields" in text
    assert f"{root / 'labels' / 'd.txt'}: line 1: box x0,y0,x1,y1 = 26,5,46,15 is outside the 40x20 image" in text
    assert f"{root / 'images' / 'e.png'}: image: cannot read" in text
    assert f"{root / 'labels' / 'z.txt'}: file: no image for this label file" in text


def test_read_dataset_picks_the_reader_by_form(tmp_path, coco_file, odvg_file):
    assert read_dataset(coco_file, coco_file.parent / "img").names == ("cat", "dog", "zebra")
    assert read_dataset(odvg_file).names == ("person", "car", "boat")
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nope.json")
    (tmp_path / "x.csv").write_text("")
    with pytest.raises(DataError, match=r"give a COCO .json, an ODVG .jsonl or a YOLO folder"):
        read_dataset(tmp_path / "x.csv")
