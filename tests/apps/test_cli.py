"""``gdino detect`` on the small random-weight checkpoint: run as a subprocess where the whole
program matters, and in-process (``main(argv)``) for error paths, where a subprocess would add
nothing but a torch import."""

from __future__ import annotations

import json
import math
import os
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
        [sys.executable, "-m", "gdino", "detect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def gdino_in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``gdino detect ARGS`` run by ``main`` in this process: for error paths, where a subprocess
    would add nothing but a torch import."""
    from gdino.apps.cli import main

    status = main(["detect", *map(str, args)])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["gdino", "detect", *map(str, args)], status, captured.out, captured.err)


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


@pytest.mark.slow  # the command line in a subprocess
def test_stdout_and_annotate(small_dir, data_dir, tmp_path, small_model):
    images = [data_dir / "chelsea.png", data_dir / "astronaut.png"]
    annotated = tmp_path / "annotated"
    run = gdino(
        *images,
        "--prompt",
        PROMPT,
        "--model",
        small_dir,
        "--box-threshold",
        "0.8",
        "--device",
        "cpu",
        "--annotate",
        annotated,
    )
    assert run.returncode == 0, run.stderr
    records = _lines(run.stdout)
    assert len(records) == 2
    for record, path in zip(records, images):
        _check_record(record, path, PHRASES, 0.8)
    assert sum(len(r["detections"]) for r in records) > 0

    # the same as the Python API, to the printed precision
    api = small_model.detect(images[0], PROMPT, box_threshold=0.8)
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


@pytest.mark.slow  # the command line in a subprocess
def test_output_file_label_list_and_bad_image(small_dir, data_dir, tmp_path):
    """good, bad, good: both good images written, one error line naming the bad one, exit 2."""
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    good = [data_dir / "chelsea.png", data_dir / "coffee.png"]
    output = tmp_path / "sub" / "results.jsonl"
    run = gdino(
        good[0],
        bad,
        good[1],
        "--prompt",
        "cat,remote control",
        "--model",
        small_dir,
        "--box-threshold",
        "0",
        "--text-threshold",
        "0",
        "--output",
        output,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    _one_line_error(run.stderr, str(bad))
    records = _lines(output.read_text())
    assert [r["image"] for r in records] == [str(p) for p in good]
    for record, path in zip(records, good):
        _check_record(record, path, ("cat", "remote control"), 0.0)
        assert len(record["detections"]) == 50  # every query of the small model


@pytest.mark.slow  # the command line in a subprocess
def test_missing_image_no_detections_same_names(small_dir, data_dir, tmp_path):
    """A missing file is reported and skipped; --box-threshold 1 keeps nothing; two images with the
    same file name get two annotated files."""
    missing = tmp_path / "missing.jpg"
    good = data_dir / "rocket.jpg"
    twin = tmp_path / "other" / "rocket.jpg"
    twin.parent.mkdir()
    Image.open(data_dir / "coffee.png").convert("RGB").save(twin)
    annotated = tmp_path / "annotated"
    run = gdino(
        missing,
        good,
        twin,
        "--prompt",
        "a rocket",
        "--model",
        small_dir,
        "--box-threshold",
        "1",
        "--annotate",
        annotated,
    )
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
    [
        ("", "empty"),
        ("   ", "empty"),
        (".", "no phrase"),
        (", ,", "empty"),
        (". ".join(["a cat"] * 100), "256"),
        ("cat,dog,cat", "twice"),
    ],
    ids=["empty", "whitespace", "dot", "empty-label-list", "too-long", "duplicate-label"],
)
def test_bad_prompt(small_dir, data_dir, tmp_path, capsys, prompt, needle):
    output = tmp_path / "out.jsonl"
    run = gdino_in_process(
        capsys, data_dir / "chelsea.png", "--prompt", prompt, "--model", small_dir, "--output", output
    )
    assert run.returncode == 2
    _one_line_error(run.stderr, needle)
    assert run.stdout == ""
    assert not output.exists() or output.read_text() == ""


def test_missing_model(data_dir, tmp_path, capsys):
    run = gdino_in_process(capsys, data_dir / "chelsea.png", "--prompt", PROMPT, "--model", tmp_path / "no-such-model")
    assert run.returncode == 2
    _one_line_error(run.stderr, "no-such-model")


# --------------------------------------------------------------------------- in-process: checks before any model work


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    """``gdino ARGS`` in this process: (exit status, stdout, stderr); argparse's exits included."""
    from gdino.apps.cli import main

    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def photos(data_dir, tmp_path) -> Path:
    """A folder with two small images (copies: the tests check they are never changed)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(data_dir / "chelsea.png").resize((80, 60)).save(folder / "chelsea.png")
    Image.open(data_dir / "rocket.jpg").resize((60, 90)).save(folder / "rocket.jpg")
    return folder


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _annotate_into(case: str, photos: Path, tmp_path: Path, monkeypatch) -> Path:
    """The --annotate folder of each way of naming the images' own files."""
    if case == "same-folder":
        return photos
    if case == "relative":
        monkeypatch.chdir(photos / "..")
        return Path("..") / tmp_path.name / "photos"
    if case == "folder-link":
        (tmp_path / "drawn").symlink_to(photos, target_is_directory=True)
        return tmp_path / "drawn"
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    if case == "file-link":  # drawn/chelsea.png -> the input: saving through it would write the input
        (drawn / "chelsea.png").symlink_to(photos / "chelsea.png")
    else:  # hard link
        os.link(photos / "chelsea.png", drawn / "chelsea.png")
    return drawn


@pytest.mark.parametrize("case", ["same-folder", "relative", "folder-link", "file-link", "hard-link"])
def test_annotate_never_writes_over_an_input(fast_dir, photos, tmp_path, monkeypatch, capsys, case):
    before = _contents(photos)
    annotate = _annotate_into(case, photos, tmp_path, monkeypatch)
    images = [photos / "chelsea.png", photos / "rocket.jpg"]
    status, out, err = run_main(
        capsys,
        "detect",
        *images,
        "--prompt",
        PROMPT,
        "--model",
        fast_dir,
        "--box-threshold",
        "0",
        "--annotate",
        annotate,
    )
    assert status == 2
    assert out == ""
    _one_line_error(err, "--annotate", "chelsea.png", "input")
    assert _contents(photos) == before


@pytest.mark.parametrize("case", ["same", "link", "relative"])
def test_output_naming_an_input_is_refused(fast_dir, photos, tmp_path, monkeypatch, capsys, case):
    before = _contents(photos)
    output = photos / "rocket.jpg"
    if case == "link":
        output = tmp_path / "results.jsonl"
        output.symlink_to(photos / "rocket.jpg")
    elif case == "relative":
        monkeypatch.chdir(photos)
        output = Path("rocket.jpg")
    status, _out, err = run_main(
        capsys,
        "detect",
        photos / "chelsea.png",
        photos / "rocket.jpg",
        "--prompt",
        PROMPT,
        "--model",
        fast_dir,
        "--output",
        output,
    )
    assert status == 2
    _one_line_error(err, "--output", "input")
    assert _contents(photos) == before


def test_output_that_is_an_annotated_file_is_refused(fast_dir, photos, tmp_path, capsys):
    drawn = tmp_path / "drawn"
    status, _, err = run_main(
        capsys,
        "detect",
        photos / "chelsea.png",
        "--prompt",
        PROMPT,
        "--model",
        fast_dir,
        "--annotate",
        drawn,
        "--output",
        drawn / "chelsea.png",
    )
    assert status == 2
    _one_line_error(err, "--output", "--annotate")


@pytest.mark.slow  # the model loaded and run batch by batch, then image by image
def test_refused_image_does_not_stop_the_run(fast_dir, photos, tmp_path, monkeypatch, capsys):
    """An image the model refuses (here: too elongated to resize) is reported and skipped; the images
    before and after it, in the same batch and in other batches, are written; exit status 2."""
    from gdino import GroundingDinoForObjectDetection, ImageError

    thin = tmp_path / "thin.png"
    Image.new("RGB", (3, 4000), (200, 30, 30)).save(thin)
    detect = GroundingDinoForObjectDetection.detect

    def refusing(self, images, *args, **kwargs):
        # What the preprocessing raises for an image whose short side resizes to 0 pixels (whether
        # this one is refused depends on the resizing rule, so the refusal is made certain here).
        if any(image.height > 100 * image.width for image in images):
            raise ImageError("a 3x4000 image is too elongated: fitting its long side into 256 pixels leaves 0x256")
        return detect(self, images, *args, **kwargs)

    monkeypatch.setattr(GroundingDinoForObjectDetection, "detect", refusing)
    good = [photos / "chelsea.png", photos / "rocket.jpg"]
    for batch_size in ("1", "3"):
        output = tmp_path / f"batch-{batch_size}.jsonl"
        status, _, err = run_main(
            capsys,
            "detect",
            good[0],
            thin,
            good[1],
            "--prompt",
            "cat,rocket",
            "--model",
            fast_dir,
            "--box-threshold",
            "0",
            "--batch-size",
            batch_size,
            "--output",
            output,
            "--annotate",
            tmp_path / "drawn",
            "--overwrite",  # the second batch size draws the same images again
        )
        assert status == 2, err
        _one_line_error(err, str(thin), "too elongated")
        records = _lines(output.read_text())
        assert [r["image"] for r in records] == [str(p) for p in good]
        assert all(len(r["detections"]) == 50 for r in records)
        assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["chelsea.png", "rocket.jpg"]


@pytest.mark.parametrize("device", ["foo", "cuda", "cuda:7"])
def test_unusable_device(fast_dir, photos, capsys, device):
    import torch

    if device != "foo" and torch.cuda.device_count() > (7 if device == "cuda:7" else 0):
        pytest.skip("that GPU is here")
    status, out, err = run_main(
        capsys, "detect", photos / "chelsea.png", "--prompt", PROMPT, "--model", fast_dir, "--device", device
    )
    assert status == 2
    assert out == ""
    _one_line_error(err, f"--device {device}")


def _unwritable(kind: str, tmp_path: Path) -> Path:
    """A path nothing can be written to, even as root: below a regular file, or in /proc."""
    if kind == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        return tmp_path / "a-file" / "sub" / "results"
    return Path("/proc/gdino-test-cannot-exist") / "results"


@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
@pytest.mark.parametrize("option", ["--output", "--annotate"])
def test_unwritable_output(fast_dir, photos, tmp_path, capsys, kind, option):
    target = _unwritable(kind, tmp_path)
    status, out, err = run_main(
        capsys, "detect", photos / "chelsea.png", "--prompt", PROMPT, "--model", fast_dir, option, target
    )
    assert status == 2
    assert out == ""
    _one_line_error(err, option, str(target))


def test_output_is_a_folder_and_annotate_is_a_file(fast_dir, photos, tmp_path, capsys):
    status, _, err = run_main(
        capsys, "detect", photos / "chelsea.png", "--prompt", PROMPT, "--model", fast_dir, "--output", tmp_path
    )
    assert status == 2
    _one_line_error(err, "--output", "folder")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me\n")
    status, _, err = run_main(
        capsys, "detect", photos / "chelsea.png", "--prompt", PROMPT, "--model", fast_dir, "--annotate", afile
    )
    assert status == 2
    _one_line_error(err, "--annotate", "is a file")
    assert afile.read_text() == "keep me\n"


BAD_NUMBERS = [
    ("detect", "--batch-size", ["0", "-3", "1.5", "two"]),
    ("detect", "--box-threshold", ["-0.1", "1.5", "nan", "inf"]),
    ("detect", "--text-threshold", ["-0.1", "1.5", "nan"]),
    ("label", "--batch-size", ["0", "-3"]),
    ("label", "--box-threshold", ["-0.1", "1.5", "nan"]),
    ("label", "--nms", ["-0.1", "2", "nan"]),
    ("eval", "--max-dets", ["0", "-1"]),
    ("eval", "--limit", ["0", "-5"]),
    ("serve", "--port", ["-1", "65536"]),
    ("serve", "--threads", ["0", "-2"]),
    ("serve", "--max-upload-mb", ["0", "-1", "nan", "inf"]),
    ("serve", "--max-pixels", ["0"]),
    ("serve", "--max-queue", ["0"]),
    ("serve", "--max-batch", ["0", "-3"]),
    ("serve", "--batch-wait-ms", ["-1", "nan"]),
]


@pytest.mark.parametrize(("command", "option", "values"), BAD_NUMBERS, ids=[f"{c}{o}" for c, o, _ in BAD_NUMBERS])
def test_numbers_out_of_range_are_refused_by_the_parser(data_dir, tmp_path, capsys, command, option, values):
    """Refused while the arguments are parsed (exit 2, the option and its range named), never used."""
    no_model = tmp_path / "no-such-model"
    before = {
        "detect": ["detect", data_dir / "chelsea.png", "--prompt", PROMPT],
        "label": ["label", data_dir, "--classes", "cat", "--out", tmp_path / "out"],
        "eval": ["eval", "coco", "--images", data_dir, "--annotations", tmp_path / "instances.json"],
        "serve": ["serve"],
    }[command]
    for value in values:
        status, out, err = run_main(capsys, *before, "--model", no_model, f"{option}={value}")
        assert status == 2, (value, err)
        assert out == ""
        assert f"argument {option}: must be" in err, err
        assert repr(value) in err.splitlines()[-1]
        assert "Traceback" not in err and "no-such-model" not in err
    assert not (tmp_path / "out").exists()


def test_good_numbers_pass(capsys):
    from gdino.apps.cli import _parser

    args = _parser().parse_args(
        ["detect", "a.png", "--prompt", "cat", "--batch-size", "2", "--box-threshold", "0", "--text-threshold", "1"]
    )
    assert (args.batch_size, args.box_threshold, args.text_threshold) == (2, 0.0, 1.0)
    args = _parser().parse_args(["serve", "--port", "0", "--batch-wait-ms", "0", "--max-upload-mb", "0.5"])
    assert (args.port, args.batch_wait_ms, args.max_upload_mb) == (0, 0.0, 0.5)
    args = _parser().parse_args(["label", "d", "--classes", "c", "--out", "o", "--nms", "0.5"])
    assert math.isclose(args.nms, 0.5) and args.batch_size == 4


EXTREME_SHAPES = [(1, 1), (1, 5000), (5000, 1), (5000, 10), (1333, 30)]  # (width, height)


def test_extreme_shapes_are_detected_and_labelled(fast_dir, tmp_path, capsys):
    """Images with fewer image tokens than queries (issue 10, item 3) go through detect and label."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for w, h in EXTREME_SHAPES:
        Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(folder / f"{w}x{h}.png")
    images = sorted(folder.iterdir())
    status, out, err = run_main(
        capsys, "detect", *images, "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "0"
    )
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["width"], r["height"]) for r in records] == [tuple(map(int, p.stem.split("x"))) for p in images]
    assert all(r["detections"] for r in records)  # threshold 0: every image gives boxes
    status, _, err = run_main(
        capsys,
        "label",
        folder,
        "--classes",
        "cat,dog",
        "--format",
        "coco",
        "--out",
        tmp_path / "out",
        "--model",
        fast_dir,
        "--box-threshold",
        "0",
    )
    assert status == 0, err
    coco = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert len(coco["images"]) == len(EXTREME_SHAPES)
    assert not (tmp_path / "out" / "errors.txt").exists() or not (tmp_path / "out" / "errors.txt").read_text().strip()
