"""The training loop: it learns, resumes exactly, freezes exactly, reports bad records, and
writes checkpoints that gdino and transformers both load (and the original .pth layout).

All runs use the small test preset on a few generated shapes images at 96 pixels."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("scipy")
from safetensors.torch import load_file

from gdino.checkpoint.loading import load_strict, read_state_dict
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.training.loader import collate
from gdino.training.settings import TrainError, TrainSettings
from gdino.training.shapes import ShapesSettings, write_shapes_dataset
from gdino.training.trainer import epoch_batches, from_config, start, train
from gdino.utils.hub import Checkpoint

pytestmark = pytest.mark.slow  # training runs, checkpoints, resumes

FAST: dict[str, Any] = {"batch_size": 2, "image_size": 96, "augment": False, "max_labels": 6, "lr": 1e-3}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """Four training and two held-out shapes images, 96-128 pixels a side, plain backgrounds."""
    settings = ShapesSettings(
        image_size=(96, 128), objects=(1, 3), radius=(0.15, 0.3), backgrounds=("flat", "gradient")
    )
    return write_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), {"train": 4, "held_out": 2}, seed=3, settings=settings, image_format="png"
    )


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_loss_falls(shapes, tmp_path):
    """A fixed batch's loss before and after 6 steps of training on the 4 images."""
    settings = TrainSettings(epochs=3, **FAST)
    run = start(shapes["train"], "config:small_test", tmp_path, settings, log=io.StringIO())
    batch = next(epoch_batches(run))

    def loss() -> float:
        inputs, labels = collate(batch, run.model.processor)
        with torch.no_grad():
            return float(run.model(**inputs, labels=labels).loss)

    before = loss()
    result = train(shapes["train"], run.model, tmp_path / "run", settings, log=io.StringIO())
    after = loss()
    assert result.position.step == 6 and len(result.history) == 3
    assert after < 0.5 * before, (before, after)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_without_augmentation_images_are_trained_at_the_image_size(shapes, tmp_path):
    """``augment=False`` still resizes to ``image_size`` (as the saved processor will at inference)."""
    settings = TrainSettings(epochs=1, max_steps=1, **{**FAST, "image_size": 64})
    run = start(shapes["train"], "config:small_test", tmp_path, settings, log=io.StringIO())
    seen: list[tuple[int, ...]] = []
    run.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(tuple(kwargs["pixel_values"].shape)), with_kwargs=True
    )
    result = train(shapes["train"], run.model, tmp_path / "run", settings, log=io.StringIO())
    assert result.position.step == 1 and len(seen) == 1
    assert min(seen[0][2:]) == 64, seen  # the images are 96-128 pixels a side
    saved = GroundingDinoForObjectDetection.from_pretrained(result.checkpoint)
    assert saved.processor.image_settings.shortest_edge == 64


class Killed(Exception):
    """Stands for a kill: raised from inside a training step."""


def test_resume_ends_with_the_same_weights_and_history(shapes, tmp_path, monkeypatch):
    """6 steps straight equal a stop by time after step 1 (``max_minutes=0``), a resume killed in
    step 4 (``save_every=1`` left last/ at step 3), and a second resume for the rest: the same
    weights bit for bit, and the same ``history.jsonl`` but for ``seconds`` (the stop's partial
    record is gone, and epoch 2's mean loss is over both of its steps, across the kill)."""
    from gdino.training import trainer

    settings = TrainSettings(epochs=3, **FAST)
    straight = train(shapes["train"], "config:small_test", tmp_path / "a", settings, log=io.StringIO())
    assert straight.position.step == 6
    stopped = train(
        shapes["train"], "config:small_test", tmp_path / "b", replace(settings, max_minutes=0.0), log=io.StringIO()
    )
    assert stopped.checkpoint == tmp_path / "b" / "last" and stopped.position.step == 1
    assert (stopped.position.epoch, stopped.position.offset) == (0, 2)  # half of epoch 1 done
    assert len(_history(tmp_path / "b")) == 1  # the stop's record, of half an epoch

    real_step, calls = trainer.train_step, []

    def killed_in_step_4(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:  # steps 2 and 3 done, last/ saved after each
            raise Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", killed_in_step_4)
    with pytest.raises(Killed):
        train(
            shapes["train"],
            "config:small_test",
            tmp_path / "b",
            replace(settings, save_every=1),
            resume=True,
            log=io.StringIO(),
        )
    monkeypatch.setattr(trainer, "train_step", real_step)
    log = io.StringIO()
    resumed = train(shapes["train"], "config:small_test", tmp_path / "b", settings, resume=True, log=log)
    assert f"resuming from {tmp_path / 'b' / 'last'}" in log.getvalue() and resumed.position.step == 6
    a, b = _weights(tmp_path / "a" / "epoch-3"), _weights(tmp_path / "b" / "epoch-3")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    # and the run did train: the weights moved from the start
    start_weights = from_config(GroundingDinoConfig.small_test(), 0).state_dict()
    assert not torch.equal(start_weights["bbox_embed.layers.2.weight"], resumed_weight(tmp_path / "b" / "epoch-3"))
    # the history: three epoch records, equal to the uninterrupted run's to the last digit
    untimed = [{k: v for k, v in r.items() if k != "seconds"} for r in _history(tmp_path / "a")]
    assert [r["step"] for r in untimed] == [2, 4, 6]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _history(tmp_path / "b")] == untimed
    assert [r["seconds"] for r in _history(tmp_path / "b")] == sorted(r["seconds"] for r in _history(tmp_path / "b"))


def _history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def resumed_weight(directory: Path) -> torch.Tensor:
    return GroundingDinoForObjectDetection.from_pretrained(directory).state_dict()["bbox_embed.layers.2.weight"]


def test_frozen_parts_stay_bit_identical(shapes, tmp_path):
    model = from_config(GroundingDinoConfig.small_test(), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, freeze=("backbone", "text"), **FAST)
    train(shapes["train"], model, tmp_path, settings, log=io.StringIO())
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.", "bert."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("transformer."))
    saved = GroundingDinoForObjectDetection.from_pretrained(tmp_path / "epoch-1").state_dict()
    assert all(torch.equal(before[k], saved[k]) for k in frozen)


def test_bad_settings_are_refused(shapes, tmp_path):
    with pytest.raises(TrainError, match="cannot freeze"):
        train(shapes["train"], "config:small_test", tmp_path, TrainSettings(freeze=("decoder",)), log=io.StringIO())
    with pytest.raises(TrainError, match="unknown preset"):
        train(shapes["train"], "config:huge", tmp_path, TrainSettings(), log=io.StringIO())
    with pytest.raises(TrainError, match=r"emulated|fp32"):
        train(
            shapes["train"],
            "config:small_test",
            tmp_path,
            TrainSettings(dtype="fp16", max_steps=1, **FAST),
            log=io.StringIO(),
        )


def test_bad_records_are_reported_and_skipped(shapes, tmp_path):
    """A box outside the image, an unknown category and an unreadable image are each named."""
    coco = json.loads(shapes["train"].read_text())
    coco["annotations"][0]["bbox"] = [90.0, 90.0, 500.0, 500.0]
    coco["annotations"][1]["category_id"] = 999
    (tmp_path / "train").mkdir()
    for image in coco["images"]:
        (tmp_path / image["file_name"]).write_bytes((shapes["train"].parent / image["file_name"]).read_bytes())
    (tmp_path / coco["images"][3]["file_name"]).write_bytes(b"not an image")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    log = io.StringIO()
    result = train(path, "config:small_test", tmp_path / "run", TrainSettings(epochs=1, **FAST), log=log)
    text = log.getvalue()
    assert "3 bad records skipped" in text, text[:2000]
    assert "annotations[0]" in text and "annotations[1]" in text and "999" in text
    assert coco["images"][3]["file_name"] in text
    left = {a["image_id"] for a in coco["annotations"][2:]} - {
        coco["annotations"][0]["image_id"],
        coco["annotations"][1]["image_id"],
        4,
    }
    assert f"{len(left)} images;" in text  # an image with a bad record is left out whole
    assert result.position.step == -(-len(left) // 2) >= 1


def test_checkpoints_load_in_gdino_and_transformers(shapes, tmp_path):
    """Each epoch's folder loads in both libraries with the same outputs; the .pth in gdino."""
    transformers = pytest.importorskip("transformers")
    settings = TrainSettings(epochs=1, export_original=True, **FAST)
    model = from_config(GroundingDinoConfig.small_test(), 0)
    train(shapes["train"], model, tmp_path, settings, log=io.StringIO())
    model.eval()
    directory = tmp_path / "epoch-1"
    ours = GroundingDinoForObjectDetection.from_pretrained(directory)
    # the original layout has no config (from_pretrained of a lone .pth assumes the tiny
    # architecture), so its weights are read and loaded strictly into the small model
    original = GroundingDinoForObjectDetection(GroundingDinoConfig.small_test())
    load_strict(original, read_state_dict(Checkpoint(directory / "groundingdino.pth", "original", None)))
    trained = model.state_dict()
    for loaded in (ours, original):
        state = loaded.state_dict()
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert ours.processor.image_settings.shortest_edge == 96

    theirs, info = transformers.GroundingDinoForObjectDetection.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = transformers.GroundingDinoProcessor.from_pretrained(directory)
    from PIL import Image

    image = Image.open(shapes["held_out"].parent / "held_out" / "00000.png")
    inputs = processor(images=image, text="red circle. green triangle.", return_tensors="pt")
    assert min(inputs["pixel_values"].shape[-2:]) == 96
    with torch.no_grad():
        expected = theirs.eval()(**inputs)
        got = ours(**dict(inputs.items()))
    assert torch.allclose(got.pred_boxes, expected.pred_boxes, atol=1e-4)
    finite = torch.isfinite(expected.logits)
    assert torch.allclose(got.logits[finite], expected.logits[finite], atol=1e-3)


def test_cli_shapes_and_train(tmp_path, capsys):
    """``gdino shapes`` writes the splits; ``gdino train`` trains a step into OUT/last and refuses a bad setting."""
    from gdino.apps.cli import main

    assert main(["shapes", "--out", str(tmp_path / "data"), "--train", "2", "--val", "0", "--held-out", "1"]) == 0
    assert (tmp_path / "data" / "train.json").is_file() and (tmp_path / "data" / "held_out.json").is_file()
    assert not (tmp_path / "data" / "val.json").exists()
    common = [
        "train",
        "--data",
        str(tmp_path / "data" / "train.json"),
        "--model",
        "config:small_test",
        "--out",
        str(tmp_path / "run"),
        "--image-size",
        "96",
        "--no-augment",
    ]
    assert main([*common, "--freeze", "decoder"]) == 2
    assert "cannot freeze ['decoder']" in capsys.readouterr().err
    assert main([*common, "--max-steps", "1", "--freeze", "backbone,text", "--aux-loss", "on"]) == 0
    err = capsys.readouterr().err
    assert "2 images, no bad records" in err and "loss" in err and "images/s" in err
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["auxiliary_loss"] is True
    assert json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])["step"] == 1


@pytest.mark.parametrize("aux_loss", [True, False])
def test_aux_loss_setting_decides_the_per_layer_terms(shapes, tmp_path, aux_loss):
    """``aux_loss`` overrides the config's ``auxiliary_loss``: per-layer terms (``loss_ce_0``...) or none."""
    settings = TrainSettings(epochs=1, aux_loss=aux_loss, **FAST)
    run = start(shapes["train"], "config:small_test", tmp_path, settings, log=io.StringIO())
    inputs, labels = collate(next(epoch_batches(run)), run.model.processor)
    with torch.no_grad():
        out = run.model(**inputs, labels=labels)
    layers = run.model.config.decoder_layers
    per_layer = {f"loss_{k}_{i}" for k in ("ce", "bbox", "giou") for i in range(layers - 1)}
    assert layers > 1 and run.model.config.auxiliary_loss is aux_loss
    assert per_layer <= set(out.loss_dict) if aux_loss else not per_layer & set(out.loss_dict)
