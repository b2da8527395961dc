"""Segmenter graphs in an ONNX export (``gdino export onnx --masks``) and the torch-free runtime's masks.

A small random SAM 2.1 (the gdino-shapes-sam architecture at a 128 px input, seeded noise on every
weight so that its masks are not degenerate) is exported once; onnxruntime's masks must be
PyTorch ``Segmenter``'s (IoU >= 0.99 per box, scores within 1e-3) for 1, 3 and 7 boxes through
the one decoder graph, and no boxes give no masks; small SAM and SAM-HQ models likewise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from gdino.inference.masks import Masks
from gdino.inference.segmenter import Segmenter
from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.model import Sam2
from gdino.runtime.onnx import SETTINGS_FILE, load_segmenter
from gdino.runtime.onnx_segmenter import OnnxSegmenter, read_segmenter_settings
from gdino.utils.hub import CheckpointError
from reference import ROOT

S = 128  # the input side: masks come out at 32 x 32
SLOW = pytest.mark.slow  # tracing the image encoder and decoder to ONNX takes about 40 s on 2 cores


def _perturb(model: torch.nn.Module) -> None:
    """Seeded noise on every parameter, so that a random model's masks are not degenerate."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() < 2 else 1 / math.sqrt(p[0].numel())))


def _perturbed_sam2() -> Sam2:
    torch.manual_seed(0)
    model = Sam2(replace(Sam2Config.shapes(), image_size=S)).eval()
    _perturb(model)
    return model


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter(_perturbed_sam2())


@pytest.fixture(scope="module")
def export_dir(segmenter, tmp_path_factory) -> Path:
    from gdino.export.onnx_masks import export_segmenter_onnx

    directory = tmp_path_factory.mktemp("onnx-masks")
    (directory / SETTINGS_FILE).write_text("{}")  # the detector's settings, which export_onnx writes first
    export_segmenter_onnx(segmenter, directory)
    return directory


@pytest.fixture(scope="module")
def runtime(export_dir) -> OnnxSegmenter:
    return load_segmenter(export_dir, threads=2)


def picture(width: int = 200, height: int = 150, seed: int = 0) -> Image.Image:
    """Smooth blobs, so that masks follow image structure."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def boxes(n: int, width: int, height: int, seed: int) -> np.ndarray:
    """(n, 4) x0 y0 x1 y1, one of them partly outside the image (clipped by both)."""
    rng = np.random.default_rng(seed)
    corners = rng.uniform(0, 1, (n, 2, 2)) * [width, height]  # (n, 2 corners, x y)
    out = np.concatenate([corners.min(1), corners.max(1)], axis=1)
    out[0, 2:] += 40  # past the right and bottom edges
    return out


def assert_same(ours: tuple[Masks, np.ndarray], theirs: tuple[Masks, np.ndarray], n: int) -> None:
    (masks, scores), (expected, expected_scores) = ours, theirs
    assert len(masks) == len(scores) == n and masks.image_size == expected.image_size
    a, b = masks.dense(), expected.dense()
    for i in range(n):
        union = (a[i] | b[i]).sum()
        assert 0 < b[i].sum() < b[i].size, "a trivial comparison: the mask is empty or the whole image"
        assert (a[i] & b[i]).sum() / union >= 0.99, f"box {i}"
    np.testing.assert_allclose(scores, expected_scores, atol=1e-3, rtol=0)


@SLOW
def test_settings_say_family_size_normalisation_and_threshold(export_dir) -> None:
    settings = json.loads((export_dir / SETTINGS_FILE).read_text())
    entry = settings["segmenter"]
    assert entry["family"] == "sam2" and entry["mask_threshold"] == 0.0
    assert entry["image"]["size"] == S and entry["image"]["square"] is True
    assert entry["image"]["image_mean"] == [0.485, 0.456, 0.406] and entry["image"]["image_std"] == [
        0.229,
        0.224,
        0.225,
    ]
    for file in entry["graphs"].values():
        assert settings["file_sizes"][file] == (export_dir / file).stat().st_size > 0


@SLOW
@pytest.mark.parametrize("n", [1, 3, 7])
def test_runtime_masks_equal_pytorch_for_any_number_of_boxes(segmenter, runtime, n) -> None:
    image = picture(seed=n)
    prompts = boxes(n, image.width, image.height, seed=n)
    assert_same(runtime.segment(image, prompts), segmenter.segment(image, prompts), n)


@SLOW
def test_decoding_in_batches_gives_the_same_masks(segmenter, export_dir) -> None:
    image = picture(240, 96, seed=5)
    prompts = boxes(7, image.width, image.height, seed=5)
    runtime = load_segmenter(export_dir, threads=2)
    runtime.batch_size = 3  # 3 + 3 + 1 boxes
    assert_same(runtime.segment(image, prompts), segmenter.segment(image, prompts), 7)


@SLOW
def test_no_boxes_give_no_masks(runtime) -> None:
    masks, scores = runtime.segment(picture(), np.zeros((0, 4)))
    assert len(masks) == 0 and scores.shape == (0,) and masks.image_size == (200, 150)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        runtime.segment(picture(), np.zeros((2, 3)))


@SLOW
@pytest.mark.parametrize("hq", [False, True], ids=["sam", "sam-hq"])
def test_sam_and_sam_hq_exports_give_pytorchs_masks(hq, tmp_path) -> None:
    """SAM's masks come in the padded square's frame, cropped by the runtime; SAM-HQ's image graph
    also gives the early features its decoder fuses."""
    from gdino.export.onnx_masks import export_segmenter_onnx
    from gdino.models.sam.config import SamConfig, SamVisionConfig
    from gdino.models.sam.model import Sam

    vision = SamVisionConfig(
        width=32, depth=2, num_heads=2, mlp_dim=64, image_size=S, patch_size=16, window_size=4, global_attn_indexes=(1,)
    )
    config = replace(
        SamConfig.vit_b(), vision=vision, prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32
    )
    torch.manual_seed(0)
    model = Sam(replace(config, hq=hq)).eval()
    _perturb(model)
    segmenter = Segmenter(model)
    (tmp_path / SETTINGS_FILE).write_text("{}")
    assert export_segmenter_onnx(segmenter, tmp_path)["family"] == "sam"
    runtime = load_segmenter(tmp_path, threads=2)
    for n in (1, 7):
        image = picture(180, 120, seed=n)  # wider than high: SAM pads the bottom
        prompts = boxes(n, image.width, image.height, seed=n)
        assert_same(runtime.segment(image, prompts), segmenter.segment(image, prompts), n)


_NO_TORCH = """
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Blocker())
import gdino.runtime.onnx
if len(sys.argv) > 1:
    import numpy as np
    segmenter = gdino.runtime.onnx.load_segmenter(sys.argv[1], threads=2)
    masks, scores = segmenter.segment(sys.argv[2], np.array(json.loads(sys.argv[3])))
    print(json.dumps({"areas": masks.areas().tolist(), "boxes": masks.boxes().tolist(), "scores": scores.tolist()}))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""


def _no_torch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_runtime_and_its_segmenter_import_without_torch() -> None:
    done = _no_torch()
    assert done.returncode == 0, done.stderr[-3000:]


@SLOW
def test_runtime_without_torch_segments_as_pytorch(segmenter, export_dir, tmp_path) -> None:
    image = picture(seed=9)
    path = tmp_path / "image.png"
    image.save(path)
    prompts = boxes(3, image.width, image.height, seed=9)
    done = _no_torch(str(export_dir), str(path), json.dumps(prompts.tolist()))
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    masks, scores = segmenter.segment(path, prompts)
    np.testing.assert_allclose(out["scores"], scores, atol=1e-3, rtol=0)
    np.testing.assert_allclose(out["areas"], masks.areas(), rtol=0.01)
    np.testing.assert_allclose(out["boxes"], masks.boxes(), atol=1.0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("sam2", "must be an object"),
        ({"family": "sam2", "image": {}, "graphs": {"image": "a.onnx"}}, "image and decoder graphs"),
        ({"family": "dino", "image": {}, "graphs": {"image": "a.onnx", "decoder": "b.onnx"}}, "'family'"),
        (
            {"family": "sam2", "image": {}, "graphs": {"image": "a", "decoder": "b"}, "coordinate_dtype": "int8"},
            "coordinate_dtype",
        ),
    ],
)
def test_broken_segmenter_settings_are_named(entry, message) -> None:
    with pytest.raises(CheckpointError, match=message):
        read_segmenter_settings(Path("gdino_onnx.json"), {"segmenter": entry})
    assert read_segmenter_settings(Path("gdino_onnx.json"), {}) is None


def test_an_export_without_segmenter_graphs_has_none_to_load(tmp_path) -> None:
    (tmp_path / SETTINGS_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match="no segmenter graphs"):
        load_segmenter(tmp_path)


def test_masks_with_an_export_without_segmenter_graphs_is_refused_before_any_image(tmp_path, monkeypatch, capsys):
    """The export loads (a stand-in here: the check reads only its ``segmenter``); the image is never read."""
    pytest.importorskip("pycocotools")
    from gdino.apps import cli

    (tmp_path / SETTINGS_FILE).write_text("{}")
    detector = SimpleNamespace(segmenter=None, phrases=lambda prompt, **_: ["cat"], detect=lambda *a, **k: None)
    monkeypatch.setattr(cli, "load_detector", lambda args, threads=None: detector)
    missing = tmp_path / "never-read.png"
    status = cli.main(["detect", str(missing), "--prompt", "cat", "--model", str(tmp_path), "--masks"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1
    assert "no segmenter graphs" in error and "gdino export onnx --masks" in error and "never-read" not in error


SHAPES_SAM = ROOT / "src" / "gdino" / "data" / "gdino-shapes-sam"


@SLOW
@pytest.mark.skipif(not SHAPES_SAM.is_dir(), reason="gdino-shapes-sam is not in this checkout yet")
def test_shipped_models_exported_give_pytorchs_masks_on_the_example(tmp_path, capsys) -> None:
    """``gdino export onnx --model gdino-shapes --masks gdino-shapes-sam`` then ``gdino detect --masks``
    on the export: each detection's mask is PyTorch's (matched by box; IoU >= 0.99)."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    from gdino.apps.cli import main

    out = tmp_path / "export"
    assert main(["export", "onnx", "--model", "gdino-shapes", "--masks", "gdino-shapes-sam", "--out", str(out)]) == 0
    capsys.readouterr()
    image = str(ROOT / "examples" / "shapes.png")
    truth = json.loads((ROOT / "examples" / "shapes.json").read_text())
    classes = ",".join(sorted({c["name"] for c in truth["categories"]}))
    records = []
    for model, masks in ((str(out), []), ("gdino-shapes", ["gdino-shapes-sam"])):
        argv = ["detect", image, "--prompt", classes, "--model", model, "--masks", *masks]
        assert main(argv) == 0
        records.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["detections"])
    exported, reference = records
    assert len(reference) >= 3
    for ref in reference:
        box = np.array(ref["box"])
        found = min(exported, key=lambda d: float(np.abs(np.array(d["box"]) - box).max()))
        assert float(np.abs(np.array(found["box"]) - box).max()) < 2.0 and found["label"] == ref["label"]
        a = mask_utils.decode({"size": found["mask"]["size"], "counts": found["mask"]["counts"].encode()})
        b = mask_utils.decode({"size": ref["mask"]["size"], "counts": ref["mask"]["counts"].encode()})
        assert (a & b).sum() / max((a | b).sum(), 1) >= 0.99


def test_export_refuses_a_segmenter_it_cannot_load_before_tracing(tmp_path, capsys) -> None:
    from gdino.apps.cli import main

    out = tmp_path / "export"
    status = main(
        ["export", "onnx", "--model", "gdino-shapes", "--masks", str(tmp_path / "no-such-sam"), "--out", str(out)]
    )
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and "--masks" in error and "no-such-sam" in error
    assert not out.exists()
