"""``gdino label`` on a folder of 31 small images (one broken) with the small model: killed with
SIGKILL part-way and started again, it skips what was done and writes exactly what an
uninterrupted run writes; broken images go to errors.txt; the exports load in their readers."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from gdino.apps.label import Settings, label_folder

CLASSES = "cat,remote control,rocket"
THRESHOLD = "0.5"


def gdino(
    *args: str | Path, background: bool = False, threads: str = "1"
) -> subprocess.Popen | subprocess.CompletedProcess:
    """``gdino label ARGS`` in a subprocess whose torch default is ``threads`` threads (OMP_NUM_THREADS)."""
    command = [sys.executable, "-m", "gdino", "label", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": threads}  # the small model gains nothing from threads
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def folder(data_dir, tmp_path_factory) -> Path:
    """See make_photos."""
    return make_photos(tmp_path_factory.mktemp("photos"), data_dir)


def make_photos(root: Path, data_dir: Path) -> Path:
    """30 images of 40-140 pixels in three sub-folders, a broken .jpg, a text file and a hidden folder."""
    sources = [
        Image.open(data_dir / n).convert("RGB") for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")
    ]
    for i in range(30):
        image = sources[i % 4].resize((40 + (i * 37) % 100, 40 + (i * 53) % 100))
        path = root / f"part{i % 3}" / f"img{i:02d}.{'png' if i % 2 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    (root / "part1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image\n")
    (root / ".thumbnails").mkdir()
    sources[0].save(root / ".thumbnails" / "hidden.png")
    return root


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file under root but the journal: bytes, or the target for a link."""
    out = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[name] = "-> " + os.readlink(path)
        elif path.is_file() and path.name != ".gdino-label.jsonl":
            out[name] = path.read_bytes()
    return out


def _journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # a killed subprocess run, then two more
def test_killed_and_started_again_equals_one_run(folder, fast_dir, tmp_path):
    common = ["--classes", CLASSES, "--model", fast_dir, "--box-threshold", THRESHOLD, "--device", "cpu"]
    out = tmp_path / "out"
    whole = gdino(folder, "--format", "yolo", "--out", out, "--batch-size", "2", *common)
    assert whole.returncode == 0, whole.stderr
    assert "label: 31 images" in whole.stderr and "1 could not be read" in whole.stderr
    reference = tmp_path / "reference"
    out.rename(reference)

    run = gdino(folder, "--format", "yolo", "--out", out, "--batch-size", "2", *common, background=True)
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
    assert 6 <= done < 31
    assert not (out / "data.yaml").exists()  # the export is written at the end only
    with open(journal, "ab") as f:  # as if the kill had cut a write short
        f.write(b'{"image": "part0/img00.jpg", "width": 1')

    again = gdino(folder, "--format", "yolo", "--out", out, "--batch-size", "2", *common)
    assert again.returncode == 0, again.stderr
    resumed = int(again.stderr.split("resuming, ")[1].split(" of 31")[0])
    assert resumed >= done - 1  # the broken image is tried again
    records = [r for r in _journal_lines(journal)[1:] if "error" not in r]
    assert sorted(r["image"] for r in records) == sorted({r["image"] for r in records})  # none done twice
    assert len(records) == 30

    assert _tree(out) == _tree(reference)
    assert len(list((out / "labels").rglob("*.txt"))) == 30
    # the other formats from the same journals: byte for byte too, without running the model again
    settings = Settings(tuple(CLASSES.split(",")), str(fast_dir), float(THRESHOLD), None)

    def no_model():
        raise AssertionError("every readable image is in the journal: the model is not needed")

    for fmt in ("coco", "voc", "jsonl"):
        for target in (out, reference):
            summary = label_folder(folder, target, fmt, settings, no_model, log=io.StringIO())
            assert (summary.images, summary.resumed, summary.errors) == (31, 30, 1)
        assert _tree(out) == _tree(reference), fmt


@pytest.mark.slow  # every export format over a folder
def test_outputs_and_errors(folder, fast_dir, tmp_path):
    from pycocotools.coco import COCO

    from gdino import GroundingDinoForObjectDetection

    out = tmp_path / "out"
    common = ["--classes", CLASSES, "--model", fast_dir, "--box-threshold", THRESHOLD, "--out", out]
    run = gdino(folder, "--format", "jsonl", "--batch-size", "4", *common)
    assert run.returncode == 0, run.stderr
    assert "label 31/31 images" in run.stderr
    errors = (out / "errors.txt").read_text().splitlines()
    assert len(errors) == 1
    name, reason = errors[0].split("\t")
    assert name == "part1/broken.jpg" and "cannot" in reason and str(folder / name) in reason

    records = [json.loads(line) for line in (out / "detections.jsonl").read_text().splitlines()]
    names = [r["image"] for r in records]
    assert len(names) == 30 and names == sorted(names) and not any("hidden" in n for n in names)
    assert sum(len(r["detections"]) for r in records) > 0
    model = GroundingDinoForObjectDetection.from_pretrained(fast_dir).eval()
    for record in records[:3]:
        found = model.detect(folder / record["image"], CLASSES.split(","), box_threshold=float(THRESHOLD))
        with Image.open(folder / record["image"]) as image:
            assert (record["width"], record["height"]) == image.size
        expected = found.to_list()  # another process may use other threads: equal to the printed precision
        assert [(d["label"], d["label_id"]) for d in record["detections"]] == [
            (d["label"], d["label_id"]) for d in expected
        ]
        for got, want in zip(record["detections"], expected):
            assert got["score"] == pytest.approx(want["score"], abs=2e-4)
            assert got["box"] == pytest.approx(want["box"], abs=0.02)

    run = gdino(folder, "--format", "coco", *common)  # from the journal
    assert run.returncode == 0, run.stderr
    coco = COCO(str(out / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES.split(",")
    assert [i["file_name"] for i in coco.loadImgs(coco.getImgIds())] == names
    boxes = sum(1 for r in records for d in r["detections"])
    assert len(coco.getAnnIds()) <= boxes and len(coco.getAnnIds()) >= boxes - 5  # a few may clip to nothing


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_other_settings_are_refused(folder, fast_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".gdino-label.jsonl").write_text(
        json.dumps(
            {"gdino_label": 1, "classes": ["cat"], "model": str(fast_dir), "box_threshold": 0.5, "nms_threshold": None}
        )
        + "\n"
        + json.dumps({"image": "part0/img00.jpg", "width": 40, "height": 40, "detections": []})
        + "\n"
    )
    run = gdino(folder, "--classes", "cat,dog", "--model", fast_dir, "--box-threshold", "0.5", "--out", out)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdino: error:") and "other settings" in lines[0]
    assert "classes" in lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--classes", " , "], "no classes"),
        (["--classes", "cat,dog,cat"], "twice"),
        (["--classes", "cat,Cat"], "same label"),
        (["--classes", "cat", "--box-threshold", "2"], "--box-threshold"),
    ],
)
@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_bad_arguments(folder, tmp_path, args, needle):
    run = gdino(folder, "--out", tmp_path / "out", "--model", tmp_path / "no-model", *args)
    assert run.returncode == 2
    assert needle in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_no_images(tmp_path, fast_dir):
    (tmp_path / "empty").mkdir()
    run = gdino(tmp_path / "empty", "--classes", "cat", "--model", fast_dir, "--out", tmp_path / "out")
    assert run.returncode == 2 and "no images" in run.stderr


@pytest.mark.slow  # labels a folder twice
def test_classes_file_and_out_inside_the_folder(data_dir, fast_dir, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    Image.open(data_dir / "coffee.png").resize((120, 80)).save(root / "coffee.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("cup\n\nhot dog, with mustard\n")
    out = root / "labels"
    for _ in range(2):  # the second run must not find the first run's images/ links as new images
        run = gdino(
            root, "--classes", classes, "--format", "yolo", "--model", fast_dir, "--out", out, "--box-threshold", "0"
        )
        assert run.returncode == 0, run.stderr
    assert (out / "classes.txt").read_text() == "cup\nhot dog, with mustard\n"
    assert "label: 1 images" in run.stderr and "resuming, 1 of 1" in run.stderr
    lines = (out / "labels" / "coffee.txt").read_text().splitlines()
    assert len(lines) == 50 and {line.split()[0] for line in lines} <= {"0", "1"}


def test_a_failing_image_does_not_lose_its_batch(folder, tmp_path):
    """The batch holding an image the detector fails on is redone image by image."""

    class Found:
        def to_list(self) -> list[dict]:
            return [{"box": [1.0, 2.0, 5.0, 6.0], "score": 0.9, "label": "cat", "label_id": 0}]

    calls = []

    def detect(images: list[Image.Image]) -> list[Found]:
        calls.append(len(images))
        if any(image.width == 125 for image in images):  # part2/img05.png
            raise RuntimeError("boom")
        return [Found() for _ in images]

    out = tmp_path / "out"
    settings = Settings(("cat",), "fake", 0.5, None)
    summary = label_folder(folder, out, "jsonl", settings, lambda: detect, batch_size=4, log=io.StringIO())
    assert (summary.images, summary.errors, summary.boxes) == (31, 2, 29)
    errors = dict(line.split("\t") for line in (out / "errors.txt").read_text().splitlines())
    assert sorted(errors) == ["part1/broken.jpg", "part2/img05.png"]
    assert errors["part2/img05.png"] == "detection failed: RuntimeError('boom')"
    assert 1 in calls and max(calls) == 4
    assert len((out / "detections.jsonl").read_text().splitlines()) == 29


def test_one_run_per_output_folder(tmp_path):
    from gdino.apps.label import Journal, LabelError

    settings = Settings(("cat",), "fake", 0.5, None)
    first = Journal(tmp_path / "journal.jsonl", settings)
    try:
        with pytest.raises(LabelError, match="another gdino label run"):
            Journal(tmp_path / "journal.jsonl", settings)
        first.add([{"image": "a.png", "width": 1, "height": 1, "detections": []}])
    finally:
        first.close()
    again = Journal(tmp_path / "journal.jsonl", settings)
    assert list(again.records) == ["a.png"]
    again.close()


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_a_wrong_model_does_not_block_the_folder(folder, fast_dir, tmp_path):
    out = tmp_path / "out"
    wrong = gdino(folder, "--classes", "cat", "--model", tmp_path / "no-such-model", "--out", out)
    assert wrong.returncode == 2 and "no-such-model" in wrong.stderr and "Traceback" not in wrong.stderr
    settings = Settings(("cat",), str(fast_dir), 0.35, None)
    with pytest.raises(AssertionError, match="loads the model"):  # the journal is taken over: it runs
        label_folder(folder, out, "coco", settings, _fail("loads the model"), log=io.StringIO())


def _fail(message: str):
    def fail():
        raise AssertionError(message)

    return fail


# --------------------------------------------------------------------------- OUT and the input folder (in-process)


def label_main(capsys, *args: str | Path) -> tuple[int, str]:
    """``gdino label ARGS`` in this process: (exit status, stderr)."""
    from gdino.apps.cli import main

    try:
        status = main(["label", *map(str, args)])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.fixture
def photos(data_dir, tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.open(data_dir / "coffee.png").resize((120, 80)).save(root / "coffee.png")
    Image.open(data_dir / "rocket.jpg").resize((60, 90)).save(root / "sub" / "rocket.jpg")
    return root


def _files(root: Path) -> dict[str, bytes | str]:
    return {
        p.relative_to(root).as_posix(): ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _one_line(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdino: error:"), stderr
    for needle in needles:
        assert needle in lines[0], stderr


@pytest.mark.parametrize("spelling", ["same", "link", "relative"])
def test_out_is_the_images_folder(photos, fast_dir, tmp_path, monkeypatch, capsys, spelling):
    """Refused (the exports' images/ links would be read as new images by the next run), twice, and
    nothing is written into the folder."""
    before = _files(photos)
    out = photos
    if spelling == "link":
        out = tmp_path / "alias"
        out.symlink_to(photos, target_is_directory=True)
    elif spelling == "relative":
        monkeypatch.chdir(photos / "sub")
        out = Path("..")
    for _ in range(2):
        status, err = label_main(
            capsys,
            photos,
            "--classes",
            "cup,rocket",
            "--format",
            "yolo",
            "--out",
            out,
            "--model",
            fast_dir,
            "--box-threshold",
            "0",
        )
        assert status == 2
        _one_line(err, "images' folder")
        assert _files(photos) == before


def test_out_inside_the_folder_twice(photos, fast_dir, capsys):
    out = photos / "sub" / "labels"
    for _ in range(2):
        status, err = label_main(
            capsys,
            photos,
            "--classes",
            "cup,rocket",
            "--format",
            "yolo",
            "--out",
            out,
            "--model",
            fast_dir,
            "--box-threshold",
            "0",
        )
        assert status == 0, err
    assert "label: 2 images" in err and "resuming, 2 of 2" in err
    links = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.*"))
    assert links == ["coffee.png", "sub/rocket.jpg"]
    assert len((out / "labels" / "coffee.txt").read_text().splitlines()) == 50


def test_links_into_out_are_not_inputs(photos, fast_dir, tmp_path, capsys):
    """A link in the folder that points into OUT (e.g. to OUT's images/ links) is not a new image."""
    out = tmp_path / "out"
    common = ["--classes", "cup,rocket", "--format", "yolo", "--out", out, "--model", fast_dir]
    status, err = label_main(capsys, photos, *common)
    assert status == 0, err
    (photos / "from-out.png").symlink_to(out / "images" / "coffee.png")
    (photos / "labelled").symlink_to(out, target_is_directory=True)
    status, err = label_main(capsys, photos, *common)
    assert status == 0, err
    assert "label: 2 images" in err and "resuming, 2 of 2" in err
    assert sorted(p.name for p in (out / "labels").rglob("*.txt")) == ["coffee.txt", "rocket.txt"]


@pytest.mark.parametrize("inside", ["images", "labels", "Annotations"])
def test_images_inside_a_folder_the_exports_write(data_dir, fast_dir, tmp_path, capsys, inside):
    """DIR = OUT/images: the YOLO export would replace each image by a link to itself. Refused."""
    out = tmp_path / "dataset"
    root = out / inside
    root.mkdir(parents=True)
    Image.open(data_dir / "coffee.png").resize((120, 80)).save(root / "coffee.png")
    before = _files(out)
    status, err = label_main(capsys, root, "--classes", "cup", "--format", "yolo", "--out", out, "--model", fast_dir)
    assert status == 2
    _one_line(err, str(root), "exports")
    assert _files(out) == before


def test_images_below_out_elsewhere_are_labelled(photos, fast_dir, tmp_path, capsys):
    """OUT holding the folder is fine where the exports do not write: data/photos with --out data."""
    status, err = label_main(
        capsys, photos, "--classes", "cup", "--format", "yolo", "--out", tmp_path, "--model", fast_dir
    )
    assert status == 0, err
    assert (tmp_path / "images" / "coffee.png").resolve() == (photos / "coffee.png").resolve()
    status, err = label_main(
        capsys, photos, "--classes", "cup", "--format", "yolo", "--out", tmp_path, "--model", fast_dir
    )
    assert status == 0 and "label: 2 images" in err and "resuming, 2 of 2" in err


@pytest.mark.parametrize("kind", ["under-a-file", "proc"])
def test_unwritable_out(photos, fast_dir, tmp_path, capsys, kind):
    if kind == "under-a-file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "labels"
    else:
        out = Path("/proc/gdino-test-cannot-exist/labels")
    status, err = label_main(capsys, photos, "--classes", "cup", "--out", out, "--model", fast_dir)
    assert status == 2
    _one_line(err, "cannot", str(out))


@pytest.mark.parametrize("device", ["foo", "cuda:7"])
def test_unusable_device(photos, fast_dir, tmp_path, capsys, device):
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("that GPU is here")
    status, err = label_main(
        capsys, photos, "--classes", "cup", "--out", tmp_path / "out", "--model", fast_dir, "--device", device
    )
    assert status == 2
    _one_line(err, f"--device {device}")


@pytest.mark.parametrize("option", ["--out", "--detections"])
def test_eval_unwritable_output_is_refused_before_the_run(photos, fast_dir, tmp_path, capsys, option):
    from gdino.apps.cli import main

    (tmp_path / "a-file").write_text("x")
    target = tmp_path / "a-file" / "metrics.json"
    annotations = tmp_path / "instances.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "coffee.png", "width": 120, "height": 80}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0}
                ],
                "categories": [{"id": 1, "name": "cup"}],
            }
        )
    )
    status = main(
        [
            "eval",
            "coco",
            "--images",
            str(photos),
            "--annotations",
            str(annotations),
            "--model",
            str(fast_dir),
            option,
            str(target),
        ]
    )
    captured = capsys.readouterr()
    assert status == 2
    _one_line(captured.err, option, str(target))
    assert captured.out == ""  # no evaluation ran
