"""``gdino detect`` run as a subprocess on the small random-weight checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROMPT = "a cat. a remote control."
PHRASES = ("a cat", "a remote control")


def gdino(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gdino.cli", "detect", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
    )


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _check_record(record: dict, path: Path, phrases, threshold: float) -> None:
    width, height = Image.open(path).size
    assert record["image"] == str(path)
    assert (record["width"], record["height"]) == (width, height)
    scores = [d["score"] for d in record["detections"]]
    assert scores == sorted(scores, reverse=True)
    for d in record["detections"]:
        assert set(d) >= {"box", "score", "label"}
        assert d["label"] in phrases
        assert phrases[d["label_id"]] == d["label"]
        assert threshold <= d["score"] <= 1  # rounded to 4 places, so >= rather than >
        x0, y0, x1, y1 = d["box"]
        assert x0 <= x1 and y0 <= y1
        assert 0 <= (x0 + x1) / 2 <= width and 0 <= (y0 + y1) / 2 <= height


def _one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("gdino: error:")
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], stderr


@pytest.fixture(scope="module")
def model(small_dir):
    from gdino import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection.from_pretrained(small_dir).eval()


def test_stdout_and_annotate(small_dir, data_dir, tmp_path, model):
    images = [data_dir / "chelsea.png", data_dir / "astronaut.png"]
    annotated = tmp_path / "annotated"
    run = gdino(*images, "--prompt", PROMPT, "--model", small_dir, "--box-threshold", "0.8",
                "--device", "cpu", "--annotate", annotated)
    assert run.returncode == 0, run.stderr
    records = _lines(run.stdout)
    assert len(records) == 2
    for record, path in zip(records, images):
        _check_record(record, path, PHRASES, 0.8)
    assert sum(len(r["detections"]) for r in records) > 0

    # the same as the Python API, to the printed precision
    api = model.detect(images[0], PROMPT, box_threshold=0.8)
    assert [d["label"] for d in records[0]["detections"]] == list(api.labels)
    np.testing.assert_allclose([d["box"] for d in records[0]["detections"]], api.boxes.reshape(-1, 4), atol=0.006)
    np.testing.assert_allclose([d["score"] for d in records[0]["detections"]], api.scores, atol=6e-5)

    for record, path in zip(records, images):
        original = np.asarray(Image.open(path).convert("RGB")).astype(int)
        drawn_path = annotated / path.name
        assert drawn_path.is_file()
        with Image.open(drawn_path) as drawn_image:
            assert drawn_image.size == Image.open(path).size
            drawn = np.asarray(drawn_image.convert("RGB")).astype(int)
        changed = np.any(drawn != original, axis=-1)  # (H, W)
        height, width = changed.shape
        if not record["detections"]:
            assert not changed.any()
            continue
        assert changed.any()
        # the outline of every box: its visible part differs from the original almost everywhere
        for d in record["detections"]:
            x0, y0, x1, y1 = (int(v) for v in d["box"])  # PIL truncates, and draws the outline inwards
            points = [(x, y) for x in range(max(x0, 0), min(x1, width - 1) + 1) for y in (y0, y1) if 0 <= y < height]
            points += [(x, y) for y in range(max(y0, 0), min(y1, height - 1) + 1) for x in (x0, x1) if 0 <= x < width]
            assert points
            assert np.mean([changed[y, x] for x, y in points]) > 0.9


def test_output_file_label_list_and_bad_image(small_dir, data_dir, tmp_path):
    """good, bad, good: both good images written, one error line naming the bad one, exit 2."""
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    good = [data_dir / "chelsea.png", data_dir / "coffee.png"]
    output = tmp_path / "sub" / "results.jsonl"
    run = gdino(good[0], bad, good[1], "--prompt", "cat,remote control", "--model", small_dir,
                "--box-threshold", "0", "--text-threshold", "0", "--output", output)
    assert run.returncode == 2
    assert run.stdout == ""
    _one_line_error(run.stderr, str(bad))
    records = _lines(output.read_text())
    assert [r["image"] for r in records] == [str(p) for p in good]
    for record, path in zip(records, good):
        _check_record(record, path, ("cat", "remote control"), 0.0)
        assert len(record["detections"]) == 50  # every query of the small model


def test_missing_image_no_detections_same_names(small_dir, data_dir, tmp_path):
    """A missing file is reported and skipped; --box-threshold 1 keeps nothing; two images with the
    same file name get two annotated files."""
    missing = tmp_path / "missing.jpg"
    good = data_dir / "rocket.jpg"
    twin = tmp_path / "other" / "rocket.jpg"
    twin.parent.mkdir()
    Image.open(data_dir / "coffee.png").convert("RGB").save(twin)
    annotated = tmp_path / "annotated"
    run = gdino(missing, good, twin, "--prompt", "a rocket", "--model", small_dir, "--box-threshold", "1",
                "--annotate", annotated)
    assert run.returncode == 2
    _one_line_error(run.stderr, str(missing))
    records = _lines(run.stdout)
    assert records == [
        {"image": str(good), "width": 640, "height": 427, "detections": []},
        {"image": str(twin), "width": 600, "height": 400, "detections": []},
    ]
    assert sorted(p.name for p in annotated.iterdir()) == ["rocket-2.jpg", "rocket.jpg"]
    with Image.open(annotated / "rocket.jpg") as drawn:
        assert drawn.size == (640, 427)
    with Image.open(annotated / "rocket-2.jpg") as drawn:
        assert drawn.size == (600, 400)


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [("", "empty"), ("   ", "empty"), (".", "no phrase"), (", ,", "empty"),
     (". ".join(["a cat"] * 100), "256"), ("cat,dog,cat", "twice")],
    ids=["empty", "whitespace", "dot", "empty-label-list", "too-long", "duplicate-label"],
)
def test_bad_prompt(small_dir, data_dir, tmp_path, prompt, needle):
    output = tmp_path / "out.jsonl"
    run = gdino(data_dir / "chelsea.png", "--prompt", prompt, "--model", small_dir, "--output", output)
    assert run.returncode == 2
    _one_line_error(run.stderr, needle)
    assert run.stdout == ""
    assert not output.exists() or output.read_text() == ""


@pytest.mark.parametrize("option", ["--box-threshold", "--text-threshold"])
@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_threshold_out_of_range(small_dir, data_dir, option, value):
    run = gdino(data_dir / "chelsea.png", "--prompt", PROMPT, "--model", small_dir, option, value)
    assert run.returncode == 2
    _one_line_error(run.stderr, option)
    assert run.stdout == ""


def test_missing_model(data_dir, tmp_path):
    run = gdino(data_dir / "chelsea.png", "--prompt", PROMPT, "--model", tmp_path / "no-such-model")
    assert run.returncode == 2
    _one_line_error(run.stderr, "no-such-model")
