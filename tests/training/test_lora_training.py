"""``gdino train --lora-rank``: only the adapters train; each checkpoint is a plain, merged one
that gdino, transformers and the original layout load, with the adapters beside it; a resume
ends with the uninterrupted run's weights; bad targets are refused before any work.

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
from gdino.training.lora import adapters, load_adapters, merge_lora, merged
from gdino.training.settings import TrainSettings
from gdino.training.shapes import ShapesSettings, write_shapes_dataset
from gdino.training.trainer import from_config, train
from gdino.utils.hub import Checkpoint

pytestmark = pytest.mark.slow  # training runs, checkpoints, resumes

FAST: dict[str, Any] = {"batch_size": 2, "image_size": 96, "augment": False, "max_labels": 6, "lr": 1e-2}
LORA = TrainSettings(epochs=1, lora_rank=4, **FAST)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """Four training and two held-out shapes images, 96-128 pixels a side, plain backgrounds."""
    settings = ShapesSettings(
        image_size=(96, 128), objects=(1, 3), radius=(0.15, 0.3), backgrounds=("flat", "gradient")
    )
    return write_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), {"train": 4, "held_out": 2}, seed=3, settings=settings, image_format="png"
    )


def _weights(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(directory / name))


def _history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_checkpoints_are_merged_and_load_in_gdino_transformers_and_the_original_layout(shapes, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = from_config(GroundingDinoConfig.small_test(), 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train(shapes["train"], model, tmp_path, replace(LORA, export_original=True), log=io.StringIO())
    directory = tmp_path / "epoch-1"
    layers = adapters(model)  # the model trained in place, adapters unmerged
    assert len(layers) == 26 and all(layer.lora_b.abs().max() > 0 for layer in layers.values())
    with merged(model):
        trained = {k: v.clone() for k, v in model.state_dict().items()}
    ours = GroundingDinoForObjectDetection.from_pretrained(directory)
    original = GroundingDinoForObjectDetection(GroundingDinoConfig.small_test())
    load_strict(original, read_state_dict(Checkpoint(directory / "groundingdino.pth", "original", None)))
    for loaded in (ours, original):
        state = loaded.state_dict()
        assert state.keys() == trained.keys()
        assert all(torch.equal(state[k], trained[k]) for k in trained)
    adapted = {f"{name}.weight" for name in layers}
    assert all(torch.equal(trained[k], start[k]) for k in trained if k not in adapted)  # the rest is frozen
    assert all(not torch.equal(trained[k], start[k]) for k in adapted)  # W + BA moved

    # the adapters beside the checkpoint: on the base model, merged, they give its weights exactly
    config = json.loads((directory / "lora_config.json").read_text())
    assert (config["rank"], config["alpha"], len(config["modules"])) == (4, 4.0, 26)
    assert config["base_model"].startswith("a model object")
    base = from_config(GroundingDinoConfig.small_test(), 0)
    assert load_adapters(base, directory) == config["modules"]
    merge_lora(base)
    assert all(torch.equal(base.state_dict()[k], trained[k]) for k in trained)

    theirs, info = transformers.GroundingDinoForObjectDetection.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = transformers.GroundingDinoProcessor.from_pretrained(directory)
    from PIL import Image

    image = Image.open(shapes["held_out"].parent / "held_out" / "00000.png")
    inputs = processor(images=image, text="red circle. green triangle.", return_tensors="pt")
    with torch.no_grad():
        expected = theirs.eval()(**inputs)
        got = ours(**dict(inputs.items()))
    assert torch.allclose(got.pred_boxes, expected.pred_boxes, atol=1e-4)
    finite = torch.isfinite(expected.logits)
    assert torch.allclose(got.logits[finite], expected.logits[finite], atol=1e-3)


class Killed(Exception):
    """Stands for a kill: raised from inside a training step."""


def test_a_resumed_lora_run_ends_with_the_uninterrupted_runs_weights(shapes, tmp_path, monkeypatch):
    """6 steps straight equal a stop by time after step 1, a resume killed in step 4 (last/ saved
    after each step), and a second resume: the merged weights and the adapters bit for bit, and
    the history; the checkpoints every step did not change what was trained."""
    from gdino.training import trainer

    settings = replace(LORA, epochs=3)
    straight = train(shapes["train"], "config:small_test", tmp_path / "a", settings, log=io.StringIO())
    assert straight.position.step == 6
    stopped = train(
        shapes["train"], "config:small_test", tmp_path / "b", replace(settings, max_minutes=0.0), log=io.StringIO()
    )
    assert stopped.position.step == 1
    real_step, calls = trainer.train_step, []

    def killed_in_step_4(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:
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
    for name in ("model.safetensors", "adapters.safetensors"):
        a, b = _weights(tmp_path / "a" / "epoch-3", name), _weights(tmp_path / "b" / "epoch-3", name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (name, different[:5])
    untimed = [{k: v for k, v in r.items() if k != "seconds"} for r in _history(tmp_path / "a")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _history(tmp_path / "b")] == untimed
    # and it trained: the adapters moved from zero
    assert any(v.abs().max() > 0 for k, v in _weights(tmp_path / "a" / "epoch-3", "adapters.safetensors").items())


def test_checkpoints_do_not_change_what_is_trained(shapes, tmp_path):
    """A checkpoint after every step (merged for the save, unmerged again) leaves training as it was."""
    settings = replace(LORA, epochs=2)
    train(shapes["train"], "config:small_test", tmp_path / "a", settings, log=io.StringIO())
    train(shapes["train"], "config:small_test", tmp_path / "b", replace(settings, save_every=1), log=io.StringIO())
    for name in ("model.safetensors", "adapters.safetensors"):
        a, b = _weights(tmp_path / "a" / "epoch-2", name), _weights(tmp_path / "b" / "epoch-2", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from gdino.apps.cli import main

    status = main(argv)
    return status, capsys.readouterr().err


def test_cli_lora_options_and_their_errors(shapes, tmp_path, capsys):
    common = ["train", "--data", str(shapes["train"]), "--model", "config:small_test", "--out", str(tmp_path / "run")]
    common += ["--image-size", "96", "--no-augment", "--max-labels", "6"]
    status, err = _cli([*common, "--lora-rank", "4", "--lora-targets", "transformer.decoder,decoder.nothing"], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "'decoder.nothing' matches no linear layer" in err and "transformer.decoder.layers.*.linear1" in err
    assert not (tmp_path / "run").exists()  # refused before any work
    for bad, message in [
        (["--lora-rank", "-1"], "LoRA rank must be 0"),
        (["--lora-alpha", "8"], "need --lora-rank"),
        (["--lora-rank", "2", "--lora-alpha", "-1"], "alpha must be positive"),
    ]:
        status, err = _cli([*common, *bad], capsys)
        assert status == 2 and message in err, (bad, err)
    assert not (tmp_path / "run").exists()

    lora = ["--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "transformer.decoder"]
    status, err = _cli([*common, "--max-steps", "1", *lora], capsys)
    assert status == 0 and "LoRA rank 2 (alpha 4) on 18 linear layers" in err  # with ref_point_head, offsets
    config = json.loads((tmp_path / "run" / "last" / "lora_config.json").read_text())
    assert config["targets"] == ["transformer.decoder"] and config["alpha"] == 4.0
    assert all(name.startswith("transformer.decoder.") for name in config["modules"])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()}

    status, err = _cli([*common, "--max-steps", "1", *lora[:-1], "transformer.nothing", "--overwrite"], capsys)
    assert status == 2 and "matches no linear layer" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "last").iterdir()} == before  # nothing removed
    status, err = _cli([*common, "--max-steps", "2", "--lora-rank", "3", "--resume"], capsys)
    assert status == 2 and "lora_rank (--lora-rank): 2 -> 3" in err
