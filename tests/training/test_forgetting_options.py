"""``--replay``, ``--distill`` and ``--lora-rank`` with resume, freeze and both-layout export: a run
stopped after its first step and resumed ends with the uninterrupted run's weights bit for bit,
frozen parts stay the base model's, and ``groundingdino.pth`` holds the same tensors as
``model.safetensors``.

The base model is the small test preset trained one epoch on a few shapes images (so it has a
``classes.txt`` for replay and distillation to keep); everything runs at 96 pixels."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("scipy")
from safetensors.torch import load_file

from gdino.checkpoint.loading import read_state_dict
from gdino.checkpoint.saving import read_classes_file
from gdino.training.optimizer import part_of
from gdino.training.replay import REPLAY_FILE
from gdino.training.settings import TrainSettings
from gdino.training.shapes import ShapesSettings, write_shapes_dataset
from gdino.training.trainer import train
from gdino.utils.hub import Checkpoint

pytestmark = pytest.mark.slow  # training runs, checkpoints, resumes

FAST: dict[str, Any] = {"batch_size": 2, "image_size": 96, "augment": False, "max_labels": 6, "lr": 1e-2}
OPTIONS: dict[str, dict[str, Any]] = {
    "replay": {"replay": True, "replay_threshold": 0.05},
    "distill": {"distill": 1.0},
    "replay, distill, frozen backbone and text": {
        "replay": True,
        "replay_threshold": 0.05,
        "distill": 1.0,
        "freeze": ("backbone", "text"),
    },
    "replay and lora": {"replay": True, "replay_threshold": 0.05, "lora_rank": 4},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    settings = ShapesSettings(
        image_size=(96, 128), objects=(1, 3), radius=(0.15, 0.3), backgrounds=("flat", "gradient")
    )
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), {"train": 4}, seed=5, settings=settings)


@pytest.fixture(scope="module")
def base(shapes, tmp_path_factory) -> Path:
    """The base checkpoint: one epoch of the small preset, with its classes.txt."""
    out = tmp_path_factory.mktemp("base")
    train(shapes["train"], "config:small_test", out, TrainSettings(epochs=1, **FAST), log=io.StringIO())
    assert read_classes_file(out / "epoch-1")
    return out / "epoch-1"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_resume_freeze_and_export_keep_working(shapes, base, tmp_path, name: str) -> None:
    settings = TrainSettings(epochs=2, export_original=True, **FAST, **OPTIONS[name])
    log = io.StringIO()
    straight = train(shapes["train"], base, tmp_path / "a", settings, log=log)
    assert straight.position.step == 4
    if settings.replay:
        assert "kept classes added" in log.getvalue()
    stopped = train(shapes["train"], base, tmp_path / "b", replace(settings, max_minutes=0.0), log=io.StringIO())
    assert stopped.position.step == 1
    log = io.StringIO()
    resumed = train(shapes["train"], base, tmp_path / "b", settings, resume=True, log=log)
    assert "resuming from" in log.getvalue() and resumed.position.step == 4

    a, b = (
        load_file(str(tmp_path / "a" / "epoch-2" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "epoch-2" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]  # the resumed run is the straight one
    start = load_file(str(base / "model.safetensors"))
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert moved, "nothing trained"
    for part in settings.freeze:
        assert not [k for k in moved if part_of(k) == part], f"{part} was frozen but moved"
    if settings.replay:
        assert (tmp_path / "a" / REPLAY_FILE).read_bytes() == (tmp_path / "b" / REPLAY_FILE).read_bytes()

    original = read_state_dict(
        Checkpoint(tmp_path / "b" / "epoch-2" / "groundingdino.pth", "original", tmp_path / "b" / "epoch-2")
    )
    ours = read_state_dict(
        Checkpoint(tmp_path / "b" / "epoch-2" / "model.safetensors", "hf", tmp_path / "b" / "epoch-2")
    )
    assert ours.keys() == original.keys() and all(torch.equal(ours[k], original[k]) for k in ours)
    assert read_classes_file(tmp_path / "b" / "epoch-2") == read_classes_file(base)
