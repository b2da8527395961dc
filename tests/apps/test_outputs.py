"""Nothing gdino writes replaces a file it did not make, unless ``--overwrite`` says so; and an
earlier ``gdino label`` output is never read as images.

Each refusal is one line on stderr, exit status 2, before any model work, and the file in the way
is left byte for byte as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    """``gdino ARGS`` in this process: (exit status, stdout, stderr)."""
    from gdino.apps.cli import main

    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _refused(status: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("gdino: error:"), err
    assert all(n in lines[0] for n in needles), err


@pytest.fixture
def photos(data_dir, tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(data_dir / "chelsea.png").resize((80, 60)).save(folder / "chelsea.png")
    Image.open(data_dir / "rocket.jpg").resize((60, 90)).save(folder / "rocket.jpg")
    return folder


def _fail_if_loaded(monkeypatch) -> None:
    """Any model load fails the test: refusals come before the model."""
    from gdino.inference.detector import GroundingDinoForObjectDetection

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(GroundingDinoForObjectDetection, "from_pretrained", classmethod(boom))


def test_detect_output_is_never_replaced_without_overwrite(photos, fast_dir, tmp_path, capsys, monkeypatch) -> None:
    image = photos / "chelsea.png"
    other = tmp_path / "holiday.png"  # a user's file where --output points
    Image.new("RGB", (8, 8), (1, 2, 3)).save(other)
    before = other.read_bytes()
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        status, _, err = run_main(capsys, "detect", image, "--prompt", "cat", "--model", fast_dir, "--output", other)
    _refused(status, err, "--output", str(other), "already exists", "--overwrite")
    assert other.read_bytes() == before
    status, _, err = run_main(
        capsys, "detect", image, "--prompt", "cat", "--model", fast_dir, "--output", other, "--overwrite"
    )
    assert status == 0, err
    assert json.loads(other.read_text().splitlines()[0])["image"] == str(image)


def test_annotated_images_never_replace_a_file(photos, fast_dir, tmp_path, capsys, monkeypatch) -> None:
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    mine = drawn / "chelsea.png"
    mine.write_bytes(b"a user's own picture")
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        status, _, err = run_main(
            capsys,
            "detect",
            photos / "chelsea.png",
            photos / "rocket.jpg",
            "--prompt",
            "cat",
            "--model",
            fast_dir,
            "--annotate",
            drawn,
        )
    _refused(status, err, "--annotate", "chelsea.png", "--overwrite")
    assert mine.read_bytes() == b"a user's own picture" and sorted(p.name for p in drawn.iterdir()) == ["chelsea.png"]
    status, _, err = run_main(
        capsys,
        "detect",
        photos / "chelsea.png",
        "--prompt",
        "cat",
        "--model",
        fast_dir,
        "--annotate",
        drawn,
        "--overwrite",
    )
    assert status == 0, err
    assert Image.open(mine).size == (80, 60)


def test_label_refuses_files_it_did_not_write(photos, fast_dir, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.json").write_text("my own annotations\n")
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        status, _, err = run_main(capsys, "label", photos, "--classes", "cat", "--out", out, "--model", fast_dir)
    _refused(status, err, "annotations.json", "no gdino label run wrote it", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json"]  # no journal, no manifest
    assert (out / "annotations.json").read_text() == "my own annotations\n"

    args = ("label", photos, "--classes", "cat", "--out", out, "--model", fast_dir, "--box-threshold", "0.9")
    status, _, err = run_main(capsys, *args, "--overwrite")
    assert status == 0, err
    assert json.loads((out / "annotations.json").read_text())["categories"][0]["name"] == "cat"
    # its own files are its own: the run again (resumed), and another format into the same OUT
    assert run_main(capsys, *args)[0] == 0
    assert run_main(capsys, *args, "--format", "yolo")[0] == 0
    manifest = (out / ".gdino-label-files.txt").read_text().splitlines()
    assert {"annotations.json", "errors.txt", "labels/chelsea.txt", "images/rocket.jpg", "data.yaml"} <= set(manifest)


def test_label_refuses_a_yolo_label_file_of_the_user(photos, fast_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    (out / "labels").mkdir(parents=True)
    (out / "labels" / "rocket.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    status, _, err = run_main(
        capsys, "label", photos, "--classes", "cat", "--out", out, "--model", fast_dir, "--format", "yolo"
    )
    _refused(status, err, "labels/rocket.txt")
    assert (out / "labels" / "rocket.txt").read_text() == "0 0.5 0.5 0.1 0.1\n"


def test_an_earlier_export_is_not_read_as_images(photos, fast_dir, tmp_path, capsys) -> None:
    """gdino label L --out L/labels --format yolo, then gdino label PARENT --out PARENT-OUT: the
    first export's image links are not labelled again."""
    parent = tmp_path / "parent"
    library = parent / "library"
    parent.mkdir()
    photos.rename(library)
    first = ("label", library, "--classes", "cat", "--out", library / "labels", "--model", fast_dir)
    assert run_main(capsys, *first, "--format", "yolo", "--box-threshold", "0.9")[0] == 0
    assert sorted(p.name for p in (library / "labels" / "images").iterdir()) == ["chelsea.png", "rocket.jpg"]
    out = tmp_path / "second"
    status, _, err = run_main(capsys, "label", parent, "--classes", "cat", "--out", out, "--model", fast_dir)
    assert status == 0, err
    assert "2 images" in err
    names = sorted(i["file_name"] for i in json.loads((out / "annotations.json").read_text())["images"])
    assert names == ["library/chelsea.png", "library/rocket.jpg"]


def test_eval_outputs_are_never_replaced_without_overwrite(tmp_path, capsys, monkeypatch) -> None:
    report = tmp_path / "report.json"
    report.write_text("{}\n")
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        status, _, err = run_main(
            capsys, "eval", "coco", "--images", tmp_path, "--annotations", tmp_path / "x.json", "--out", report
        )
    _refused(status, err, "--out", "already exists")
    assert report.read_text() == "{}\n"


def test_export_goes_into_a_new_or_empty_folder(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with monkeypatch.context() as m:
        _fail_if_loaded(m)
        status, _, err = run_main(capsys, "export", "onnx", "--model", tmp_path, "--out", out)
    _refused(status, err, "--out", "not empty", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine\n"
