"""Every command runs on every family member: an MM-Grounding-DINO (LLMDet) checkpoint with one
head per decoder layer is labelled with, fine-tuned (and its checkpoint loads in gdino and in
transformers as an MMGroundingDinoForObjectDetection), and exported to ONNX, at a small size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reference import as_mm_config, build_reference, save_reference, small_reference_config


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory) -> Path:
    """A small MM-Grounding-DINO with per-layer heads, saved by transformers, 160-pixel images."""
    reference = build_reference(as_mm_config(small_reference_config(), share=False), seed=11)
    directory = save_reference(reference, tmp_path_factory.mktemp("mm"))
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = directory / name
        if path.exists():
            config = json.loads(path.read_text())
            config.get("image_processor", config)["size"] = {"shortest_edge": 160, "longest_edge": 256}
            path.write_text(json.dumps(config))
    return directory


def test_label_runs_on_an_mm_checkpoint(mm_dir, data_dir, tmp_path, capsys) -> None:
    from gdino.apps.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea.png", "astronaut.png"):
        Image.open(data_dir / name).resize((96, 64)).save(images / name)
    out = tmp_path / "out"
    assert main(["label", str(images), "--classes", "cat,person", "--out", str(out), "--model", str(mm_dir)]) == 0
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["cat", "person"] and len(coco["images"]) == 2
    assert "2 images" in capsys.readouterr().err


@pytest.mark.slow  # a few training steps and two loads
def test_fine_tuning_an_mm_checkpoint_saves_one_transformers_loads(mm_dir, tmp_path) -> None:
    pytest.importorskip("scipy")
    from transformers import MMGroundingDinoForObjectDetection

    from gdino import GroundingDinoForObjectDetection
    from gdino.training.settings import TrainSettings
    from gdino.training.shapes import ShapesSettings, write_shapes_dataset
    from gdino.training.trainer import train

    shapes = write_shapes_dataset(
        tmp_path / "shapes", {"train": 4}, seed=3, settings=ShapesSettings(image_size=(96, 128)), image_format="png"
    )
    settings = TrainSettings(epochs=1, max_steps=2, batch_size=2, image_size=96, augment=False, lr=1e-3)
    train(shapes["train"], str(mm_dir), tmp_path / "run", settings, log=io.StringIO())
    saved = tmp_path / "run" / "last"
    ours = GroundingDinoForObjectDetection.from_pretrained(saved)
    assert (ours.config.model_type, ours.config.share_box_heads) == ("mm-grounding-dino", False)
    theirs = MMGroundingDinoForObjectDetection.from_pretrained(saved).eval()
    before = GroundingDinoForObjectDetection.from_pretrained(mm_dir)
    assert not torch.equal(ours.class_embed[0].bias, before.class_embed[0].bias)  # the per-layer heads trained
    inputs = ours.processor(images=Image.new("RGB", (128, 96), (90, 20, 200)), text="a red circle.")
    with torch.no_grad():
        ref = theirs(**inputs)
        index = ref.enc_outputs_class.max(-1).values.topk(ref.logits.shape[1], dim=1).indices
        out = ours(**inputs, query_index=index)
    torch.testing.assert_close(out.pred_boxes, ref.pred_boxes, atol=1e-4, rtol=0)


@pytest.mark.slow  # an ONNX export
def test_an_mm_checkpoint_exports_and_runs_on_onnxruntime(mm_dir, data_dir, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from gdino import GroundingDinoForObjectDetection
    from gdino.export.onnx import export_onnx
    from gdino.runtime.onnx import load

    model = GroundingDinoForObjectDetection.from_pretrained(mm_dir)
    export_onnx(model, tmp_path / "export")
    runtime = load(tmp_path / "export", threads=2)
    image = data_dir / "chelsea.png"
    for prompt in ("a cat. a remote control.", ["cat", "sofa"]):
        a = model.detect(image, prompt, box_threshold=0.0, text_threshold=0.0)
        b = runtime.detect(image, prompt, box_threshold=0.0, text_threshold=0.0)
        assert len(a) == len(b) > 0
        # the same scores, best first (a near-tie in query selection could swap two queries' slots)
        np.testing.assert_allclose(a.scores[:20], b.scores[:20], atol=1e-3)
