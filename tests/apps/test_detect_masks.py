"""``gdino detect --masks``: RLE and mask scores in the JSON, masks drawn by ``--annotate``, and the
refusals made before any image is read. In process, on the small test detector; the segmenter is
the ellipse stand-in (``tests/ellipse_segmenter.py``) except where the real one is loaded."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("pycocotools", reason="the masks extra is not installed: pip install -e '.[masks]'")
from pycocotools import mask as mask_utils

from ellipse_segmenter import EllipseSegmenter, ellipse
from gdino.apps import masking
from gdino.apps.cli import main
from gdino.apps.draw import MASK_OPACITY, draw_detections
from gdino.inference.detections import Detections
from gdino.inference.masks import Masks

PROMPT = "a cat. a remote control."
# pycocotools' decode under numpy 2 warns about its own __array__; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    status = main(["detect", *map(str, args)])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["gdino", "detect"], status, captured.out, captured.err)


@pytest.fixture
def stand_in(monkeypatch) -> list[EllipseSegmenter]:
    """Makes ``--masks`` load an ``EllipseSegmenter``; the list holds each one loaded."""
    loaded: list[EllipseSegmenter] = []

    def load(name: str, device, dtype) -> EllipseSegmenter:
        loaded.append(EllipseSegmenter())
        return loaded[-1]

    monkeypatch.setattr(masking, "_load", load)
    return loaded


@pytest.fixture
def photos(data_dir, tmp_path) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(data_dir / "chelsea.png").resize((120, 80)).save(folder / "chelsea.png")
    Image.open(data_dir / "rocket.jpg").resize((60, 90)).save(folder / "rocket.png")
    return [folder / "chelsea.png", folder / "rocket.png"]


def _one_line_error(stderr: str, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gdino: error:"), stderr
    assert all(n in lines[0] for n in needles), stderr


def test_each_detection_gets_its_rle_and_score(fast_dir, photos, stand_in, capsys):
    done = run(capsys, *photos, "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "0.2", "--masks")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(stand_in) == 1 and stand_in[0].calls == [len(r["detections"]) for r in records]  # loaded once
    assert sum(len(r["detections"]) for r in records) > 0, "the test model finds boxes at 0.2"
    for record in records:
        width, height = record["width"], record["height"]
        for d in record["detections"]:
            assert d["mask"]["size"] == [height, width] and isinstance(d["mask"]["counts"], str)
            decoded = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
            want = ellipse(np.array(d["box"]), width, height)  # the box is rounded to 2 decimals: a pixel may differ
            assert decoded.shape == (height, width)
            assert np.logical_xor(decoded, want).sum() <= max(4, 0.05 * want.sum())
            x0, y0, x1, y1 = d["box"]
            area = (x1 - x0) * (y1 - y0)
            assert d["mask_score"] == pytest.approx(0.5 + area / (2 * width * height), abs=2e-3)

    main(["detect", *map(str, photos), "--prompt", PROMPT, "--model", str(fast_dir), "--box-threshold", "0.2"])
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for with_masks, without in zip(records, plain):  # the boxes are the same with and without masks
        assert [{k: d[k] for k in ("box", "score", "label")} for d in with_masks["detections"]] == [
            {k: d[k] for k in ("box", "score", "label")} for d in without["detections"]
        ]
        assert all("mask" not in d for d in without["detections"])


def test_no_detections_means_no_masks(fast_dir, photos, stand_in, capsys):
    done = run(capsys, photos[0], "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "1", "--masks", "x")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["detections"] == [] and stand_in[0].calls == [0]


def test_annotate_fills_the_masks_under_the_boxes(fast_dir, photos, tmp_path, stand_in, capsys):
    drawn = tmp_path / "drawn"
    done = run(
        capsys,
        *photos,
        "--prompt",
        PROMPT,
        "--model",
        fast_dir,
        "--box-threshold",
        "0.2",
        "--masks",
        "--annotate",
        drawn,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    for record, path in zip(records, photos):
        original = np.asarray(Image.open(path).convert("RGB")).astype(int)
        changed = np.any(np.asarray(Image.open(drawn / path.name).convert("RGB")).astype(int) != original, axis=-1)
        for d in record["detections"]:
            inside = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}).astype(bool)
            assert changed[inside].mean() > 0.9  # the translucent fill covers the mask


def test_draw_masks_blends_the_fill_and_outlines_it():
    image = Image.new("RGB", (100, 80), (100, 100, 100))
    boxes = np.array([[10, 10, 60, 70], [70, 20, 95, 40]], np.float32)
    masks = Masks.from_dense(np.stack([ellipse(b, 100, 80) for b in boxes]))
    found = Detections(boxes, np.array([0.9, 0.8], np.float32), ("a", "b"), np.array([0, 1]), (100, 80))
    plain = np.asarray(draw_detections(image, found, width=2)).astype(int)
    drawn = np.asarray(draw_detections(image, found.with_masks(masks, np.ones(2)), width=2)).astype(int)
    red, green = (230, 25, 75), (60, 180, 75)  # the palette's first two colours
    blend = [round(100 * (1 - MASK_OPACITY) + c * MASK_OPACITY) for c in red]
    assert drawn[40, 35].tolist() == blend and plain[40, 35].tolist() == [100, 100, 100]  # the centre of mask 0
    assert drawn[59, 16].tolist() == list(red) and drawn[59, 17].tolist() == blend  # the outline, 1 pixel wide
    assert drawn[59, 15].tolist() == plain[59, 16].tolist() == [100, 100, 100]  # outside the ellipse
    assert drawn[30, 82].tolist() == [round(100 * (1 - MASK_OPACITY) + c * MASK_OPACITY) for c in green]
    assert drawn[65, 14].tolist() == [100, 100, 100]  # in box 0, outside its ellipse: untouched
    assert (
        drawn[found.boxes[0, 1].astype(int), 20:50] == plain[found.boxes[0, 1].astype(int), 20:50]
    ).all()  # boxes on top


def test_a_bad_masks_model_is_one_line_before_any_image(fast_dir, tmp_path, capsys):
    done = run(capsys, tmp_path / "missing.png", "--prompt", PROMPT, "--model", fast_dir, "--masks", tmp_path / "nope")
    assert done.returncode == 2 and done.stdout == ""
    _one_line_error(done.stderr, "--masks")
    assert "missing.png" not in done.stderr  # refused before the images were read


def test_masks_with_an_onnx_export_without_segmenter_graphs_is_refused(fast_model, tmp_path, monkeypatch, capsys):
    from gdino.apps import cli
    from gdino.runtime.onnx import SETTINGS_FILE

    export = tmp_path / "export"
    export.mkdir()
    (export / SETTINGS_FILE).write_text("{}")  # what makes a folder an export to the command line
    monkeypatch.setattr(cli, "load_detector", lambda args: fast_model)  # a detector with no `segmenter`
    done = run(capsys, tmp_path / "missing.png", "--prompt", PROMPT, "--model", export, "--masks")
    assert done.returncode == 2 and done.stdout == ""
    _one_line_error(done.stderr, "--masks", "segmenter graphs")


@pytest.mark.slow  # loads the detector and a SAM 2.1, and runs both twice
def test_a_real_sam2_gives_its_masks_through_the_command_line(fast_dir, fast_model, photos, tmp_path, capsys):
    """A tiny random SAM 2.1 saved in the Hugging Face layout: the JSON holds its masks for the boxes."""
    import torch
    from safetensors.torch import save_file

    from gdino.checkpoint.convert_sam2 import ours_to_hf
    from gdino.inference.segmenter import Segmenter
    from gdino.models.sam2.config import Sam2Config
    from gdino.models.sam2.model import Sam2

    torch.manual_seed(0)
    config = replace(Sam2Config.shapes(), image_size=128)
    model = Sam2(config).eval()
    with torch.no_grad():  # seeded noise, so that the random model's masks are not all empty or full
        g = torch.Generator().manual_seed(1)
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() < 2 else 1 / p[0].numel() ** 0.5))
    directory = tmp_path / "sam2"
    directory.mkdir()
    save_file(
        {k: v.clone().contiguous() for k, v in ours_to_hf(model.state_dict()).items()},
        str(directory / "model.safetensors"),
    )
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))

    done = run(
        capsys, photos[0], "--prompt", PROMPT, "--model", fast_dir, "--box-threshold", "0.2", "--masks", directory
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    found = fast_model.detect(photos[0], PROMPT, 0.2)
    want = Segmenter.from_pretrained(directory).add_masks(photos[0], found).to_list()
    assert len(want) > 0 and [d["mask"] for d in record["detections"]] == [d["mask"] for d in want]
    assert [d["mask_score"] for d in record["detections"]] == pytest.approx([d["mask_score"] for d in want], abs=1e-4)
    assert any(_decoded(d["mask"]).any() for d in record["detections"])  # masks with pixels, not only empty ones


def _decoded(mask: dict) -> np.ndarray:
    return mask_utils.decode({"size": mask["size"], "counts": mask["counts"].encode()}).astype(bool)
