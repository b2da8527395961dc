"""``--tile`` on ``gdino detect``, ``label`` and ``eval coco`` (in process, ``main(argv)``) and the
``tile`` request fields of ``gdino serve`` (FastAPI's TestClient), on the small model at 160 pixels:
each gives what ``detect(..., tiles=...)`` gives, and bad tile settings are refused before any work."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gdino.apps.cli import main
from gdino.inference.tiles import TileSettings

PROMPT = "a cat. a remote control."


@pytest.fixture(scope="module")
def photo(data_dir, tmp_path_factory) -> Path:
    """A 400x300 photo: 9 tiles of 160 pixels at overlap 0.2, and the whole image."""
    path = tmp_path_factory.mktemp("tiles") / "cat.png"
    Image.open(data_dir / "chelsea.png").convert("RGB").resize((400, 300)).save(path)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``gdino ARGS`` in this process: (exit status, stdout, stderr); argparse's exits count as a status."""
    try:
        status = main([str(a) for a in args])
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --------------------------------------------------------------------------- gdino detect


@pytest.mark.slow  # two runs of the command, each loading the model
def test_detect_with_tiles_gives_tiled_detections(capsys, fast_dir, fast_model, photo) -> None:
    status, out, err = run(
        capsys, "detect", photo, "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "0.2", "--tile", "160"
    )
    assert status == 0, err
    record = json.loads(out)
    image = Image.open(photo)
    expected = fast_model.detect(image, PROMPT, 0.2, tiles=TileSettings(160), batch_size=1)
    assert record["detections"] == expected.to_list() and len(expected) > 0
    assert expected.to_list() != fast_model.detect(image, PROMPT, 0.2).to_list()  # tiling changed something

    status, out, err = run(
        capsys, "detect", photo, "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "0.2",
        "--tile", "200", "--tile-overlap", "0.1", "--tile-merge", "nms", "--no-full-image", "--batch-size", "3",
    )  # fmt: skip
    assert status == 0, err
    settings = TileSettings(200, 0.1, full_image=False, merge="nms")
    expected = fast_model.detect(image, PROMPT, 0.2, tiles=settings, batch_size=3)
    assert [d["label"] for d in json.loads(out)["detections"]] == list(expected.labels)
    np.testing.assert_allclose([d["box"] for d in json.loads(out)["detections"]], expected.boxes, atol=0.02)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tile", "16"), "--tile: must be a whole number of at least 32 pixels"),
        (("--tile", "big"), "--tile: must be a whole number"),
        (("--tile", "160", "--tile-overlap", "0.9"), "--tile-overlap: must be a number from 0 up to"),
        (("--tile", "160", "--tile-overlap", "-0.1"), "--tile-overlap: must be a number from 0 up to"),
        (("--tile-overlap", "0.3"), "--tile-overlap sets how tiles are detected: give it with --tile SIZE"),
        (("--no-full-image",), "--no-full-image sets how tiles are detected"),
        (("--tile", "160", "--tile-merge", "union"), "--tile-merge: invalid choice"),
    ],
)
def test_detect_refuses_bad_tile_options(capsys, photo, args: tuple[str, ...], needle: str) -> None:
    status, out, err = run(capsys, "detect", photo, "--prompt", PROMPT, "--model", "/nowhere", *args)
    assert status == 2 and out == ""
    assert needle in err


@pytest.mark.slow  # the command loads the model
def test_detect_refuses_a_tile_over_the_image(capsys, fast_dir, photo, data_dir) -> None:
    status, out, err = run(capsys, "detect", photo, data_dir / "chelsea.png", "--prompt", PROMPT,
                           "--model", fast_dir, "--tile", "420")  # fmt: skip
    assert status == 2
    message = f"{photo}: tile size 420 is over the 400x300 image; give a tile of at most 400 pixels"
    assert err.splitlines()[0] == f"gdino: error: {message}, or detect without tiles"
    assert [json.loads(line)["width"] for line in out.splitlines()] == [451]  # the other image is still detected


# --------------------------------------------------------------------------- gdino label and eval coco


@pytest.mark.slow  # three runs of the command, two loading the model
def test_label_with_tiles(capsys, fast_dir, fast_model, photo, tmp_path) -> None:
    out = tmp_path / "out"
    common = ["label", photo.parent, "--classes", "cat,sofa", "--format", "jsonl", "--out", out, "--model", fast_dir]
    status, _, err = run(capsys, *common, "--box-threshold", "0.2", "--tile", "160", "--batch-size", "4")
    assert status == 0, err
    lines = [json.loads(line) for line in (out / ".gdino-label.jsonl").read_text().splitlines()]
    assert lines[0]["tiles"] == "160 overlap 0.2 greedynmm ios 0.5 full"
    expected = fast_model.detect(Image.open(photo), ["cat", "sofa"], 0.2, tiles=TileSettings(160), batch_size=4)
    found = lines[1]["detections"]
    assert len(found) == len(expected) > 0
    assert [d["label"] for d in found] == list(expected.labels)
    status, _, err = run(capsys, *common, "--box-threshold", "0.2", "--tile", "200")
    assert status == 2 and "other settings" in err  # a run is resumed only with its own tiles


@pytest.mark.slow  # the command loads the model and pycocotools
def test_eval_coco_with_tiles(capsys, fast_dir, fast_model, photo, tmp_path) -> None:
    from gdino.evaluation.tiled import TiledModelDetector

    categories = [{"id": 3, "name": "cat"}, {"id": 8, "name": "remote control"}]
    annotation = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [60, 40, 200, 200], "area": 40000, "iscrowd": 0}
    instances = tmp_path / "instances.json"
    entry = {"id": 1, "file_name": photo.name, "width": 400, "height": 300}
    instances.write_text(json.dumps({"images": [entry], "annotations": [annotation], "categories": categories}))
    results = tmp_path / "detections.json"
    status, out, err = run(capsys, "eval", "coco", "--images", photo.parent, "--annotations", instances,
                           "--model", fast_dir, "--tile", "160", "--detections", results)  # fmt: skip
    assert status == 0, err
    assert "Average Precision" in out
    written = json.loads(results.read_text())
    _, scores, ids = TiledModelDetector(fast_model, ["cat", "remote control"], TileSettings(160))(
        np.asarray(Image.open(photo).convert("RGB")), entry
    )
    assert len(written) == len(scores) > 0
    assert [r["category_id"] for r in written] == [[3, 8][i] for i in ids]
    np.testing.assert_allclose([r["score"] for r in written], scores, atol=1e-4)
    assert min(scores) > 0.1  # EVAL_TILE_THRESHOLD
    status, _, err = run(capsys, "eval", "coco", "--images", photo.parent, "--annotations", instances,
                         "--model", fast_dir, "--tile", "12")  # fmt: skip
    assert status == 2 and "at least 32 pixels" in err


# --------------------------------------------------------------------------- gdino serve


@pytest.fixture(scope="module")
def client(fast_model):
    from fastapi.testclient import TestClient

    from gdino.apps.server.app import Settings, create_app

    with TestClient(create_app(fast_model, Settings(max_chunks=12)), raise_server_exceptions=False) as c:
        yield c


def test_serve_with_tiles(client, fast_model, photo) -> None:
    data = photo.read_bytes()
    answer = client.post("/v1/detect", files={"image": ("cat.png", data)}, data={"prompt": PROMPT, "tile": "160"})
    assert answer.status_code == 200, answer.text
    expected = fast_model.detect(Image.open(photo), PROMPT, 0.35, 0.25, tiles=TileSettings(160), batch_size=4)
    assert [d["label"] for d in answer.json()["detections"]] == list(expected.labels)
    np.testing.assert_allclose(
        np.array([d["box"] for d in answer.json()["detections"]]).reshape(-1, 4), expected.boxes, atol=0.02
    )
    body = {"image": base64.b64encode(data).decode(), "labels": ["cat", "sofa"], "tile": 200, "full_image": False}
    answer = client.post("/v1/detect", json={**body, "tile_merge": "nms", "tile_overlap": 0.1})
    assert answer.status_code == 200, answer.text
    expected = fast_model.detect(
        Image.open(photo), ["cat", "sofa"], tiles=TileSettings(200, 0.1, False, "nms"), batch_size=4
    )
    assert [d["label"] for d in answer.json()["detections"]] == list(expected.labels)


@pytest.mark.parametrize(
    ("fields", "status", "kind", "needle"),
    [
        ({"tile": "16"}, 422, "invalid_tiles", "size must be at least 32 pixels"),
        ({"tile": "a lot"}, 422, "invalid_tiles", "tile must be a whole number"),
        ({"tile": "160", "tile_overlap": "0.9"}, 422, "invalid_tiles", "overlap must be in [0, 0.9)"),
        ({"tile": "160", "tile_merge": "union"}, 422, "invalid_tiles", "merge must be one of"),
        ({"tile": "160", "full_image": "maybe"}, 422, "invalid_tiles", "full_image must be true or false"),
        ({"tile_overlap": "0.3"}, 422, "invalid_tiles", "give it with tile"),
        ({"tile": "500"}, 422, "invalid_tiles", "tile size 500 is over the 400x300 image"),
        ({"tile": "100"}, 413, "too_many_tiles", "21 tiles (with the whole image) x 1 label chunk(s) need 21"),
    ],
)
def test_serve_refuses_bad_tiles(client, photo, fields: dict, status: int, kind: str, needle: str) -> None:
    answer = client.post(
        "/v1/detect", files={"image": ("cat.png", photo.read_bytes())}, data={"prompt": PROMPT, **fields}
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"] == kind and needle in answer.json()["detail"]


def test_serve_counts_tiles_times_chunks(client, photo) -> None:
    labels = [f"thing {i}" for i in range(120)]  # two chunks: 10 passes x 2 > 12
    image = base64.b64encode(photo.read_bytes()).decode()
    answer = client.post("/v1/detect", json={"image": image, "labels": labels, "tile": 160})
    assert answer.status_code == 413 and "x 2 label chunk(s) need 20 passes" in answer.json()["detail"]
    assert client.post("/v1/detect", json={"image": image, "labels": labels}).status_code == 200


def test_bad_json_tile_types(client, photo) -> None:
    image = base64.b64encode(photo.read_bytes()).decode()
    for bad in ({"tile": 160.5}, {"tile": True}, {"tile": 160, "tile_overlap": "lots"}, {"tile": 160, "full_image": 2}):
        answer = client.post("/v1/detect", json={"image": image, "prompt": PROMPT, **bad})
        assert answer.status_code == 422 and answer.json()["error"] == "invalid_tiles", (bad, answer.text)


# --------------------------------------------------------------------------- masks of tiled detections


@pytest.fixture
def ellipses(monkeypatch) -> list:
    """Makes ``--masks`` load an ``EllipseSegmenter`` (tests/ellipse_segmenter.py); the list holds it."""
    from ellipse_segmenter import EllipseSegmenter
    from gdino.apps import masking

    loaded: list = []
    monkeypatch.setattr(masking, "_load", lambda name, device, dtype: loaded.append(EllipseSegmenter()) or loaded[-1])
    return loaded


def _assert_ellipse_masks(detections: list[dict], width: int, height: int) -> None:
    from pycocotools import mask as mask_utils

    from ellipse_segmenter import ellipse

    assert detections and all("mask" in d for d in detections)
    for d in detections:
        decoded = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)
        want = ellipse(np.array(d["box"]), width, height)  # the box is rounded to 2 decimals: a pixel may differ
        assert np.logical_xor(decoded, want).sum() <= max(4, 0.05 * want.sum())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_detect_and_label_segment_tiled_boxes_on_their_tiles(capsys, fast_dir, photo, tmp_path, ellipses) -> None:
    pytest.importorskip("pycocotools")
    common = ["--model", fast_dir, "--box-threshold", "0.2", "--tile", "160", "--masks"]
    status, out, err = run(capsys, "detect", photo, "--prompt", PROMPT, *common)
    assert status == 0, err
    record = json.loads(out)
    _assert_ellipse_masks(record["detections"], 400, 300)
    segmenter = ellipses[-1]
    assert sum(segmenter.calls) == len(record["detections"])
    assert (160, 160) in segmenter.sizes and len(segmenter.sizes) > 1  # on tile crops, not the 400x300 image

    out_dir = tmp_path / "labelled"
    status, _, err = run(capsys, "label", photo.parent, "--classes", "cat,sofa", "--format", "jsonl", "--out", out_dir,
                         *common)  # fmt: skip
    assert status == 0, err
    lines = [json.loads(line) for line in (out_dir / ".gdino-label.jsonl").read_text().splitlines()]
    _assert_ellipse_masks(lines[1]["detections"], 400, 300)
    assert (160, 160) in ellipses[-1].sizes


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_serve_segments_tiled_boxes_on_their_tiles(fast_model, photo) -> None:
    pytest.importorskip("pycocotools")
    from fastapi.testclient import TestClient

    from ellipse_segmenter import EllipseSegmenter
    from gdino.apps.server.app import Settings, create_app

    segmenter = EllipseSegmenter()
    app = create_app(fast_model, Settings(max_chunks=12, max_masks=1000), segmenter=segmenter)
    with TestClient(app, raise_server_exceptions=False) as client:
        fields = {"prompt": PROMPT, "tile": "160", "masks": "true", "box_threshold": "0.2"}
        answer = client.post("/v1/detect", files={"image": ("cat.png", photo.read_bytes())}, data=fields)
    assert answer.status_code == 200, answer.text
    _assert_ellipse_masks(answer.json()["detections"], 400, 300)
    assert (160, 160) in segmenter.sizes and (400, 300) not in segmenter.sizes[:1]
