"""One run per output folder: a folder that holds a run is refused unless ``resume`` (with the
run's settings; each one that differs is named) or ``overwrite`` (the old run's files removed,
no others); a finished run resumed is left byte for byte as it was; files that no gdino training
run wrote are never replaced. The history after a stop, a kill and resumes is in
``test_training_loop.py``.

All runs use the small test preset on four generated shapes images at 96 pixels, 2 steps an epoch."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("scipy")

from gdino.training.settings import TrainError, TrainSettings
from gdino.training.shapes import ShapesSettings, write_shapes_dataset
from gdino.training.trainer import train

pytestmark = pytest.mark.slow  # training runs and checkpoints

FAST: dict[str, Any] = {"batch_size": 2, "image_size": 96, "augment": False, "max_labels": 6, "lr": 1e-3}
MODEL = "config:small_test"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """Four training and two held-out shapes images, 96-128 pixels a side, plain backgrounds."""
    settings = ShapesSettings(
        image_size=(96, 128), objects=(1, 3), radius=(0.15, 0.3), backgrounds=("flat", "gradient")
    )
    return write_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), {"train": 4, "held_out": 2}, seed=3, settings=settings, image_format="png"
    )


@pytest.fixture(scope="module")
def one_step(shapes, tmp_path_factory) -> Path:
    """A run stopped by ``max_steps=1`` (``last/``, ``history.jsonl``, ``train_settings.json``); copy it before use."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    train(shapes["train"], MODEL, out, TrainSettings(epochs=1, max_steps=1, **FAST), log=io.StringIO())
    return out


def _files(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by its path relative to it, with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _copy(run: Path, to: Path) -> Path:
    for name, data in _files(run).items():
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        (to / name).write_bytes(data)
    return to


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from gdino.apps.cli import main

    status = main(argv)
    return status, capsys.readouterr().err


def test_a_folder_that_holds_a_run_is_refused_without_resume_or_overwrite(shapes, one_step, tmp_path, capsys):
    """The API raises TrainError, the CLI exits 2 with one line, and the run's files are untouched."""
    out = _copy(one_step, tmp_path / "run")
    before = _files(out)
    assert {"last/model.safetensors", "history.jsonl", "train_settings.json"} <= before.keys()
    with pytest.raises(TrainError, match=r"holds a training run; give --resume .* --overwrite"):
        train(shapes["train"], MODEL, out, TrainSettings(epochs=1, max_steps=1, **FAST), log=io.StringIO())
    argv = ["train", "--data", str(shapes["train"]), "--model", MODEL, "--out", str(out), "--image-size", "96"]
    status, err = _cli([*argv, "--no-augment", "--max-labels", "6", "--epochs", "1", "--max-steps", "1"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("gdino: error:")]
    assert status == 2 and len(errors) == 1 and "holds a training run" in errors[0], err
    assert err.splitlines()[-1] == errors[0]
    status, err = _cli([*argv, "--resume", "--overwrite"], capsys)
    assert status == 2 and err.strip().splitlines()[-1] == "gdino: error: give --resume or --overwrite, not both"
    assert _files(out) == before


def test_resume_with_other_settings_names_each_one(shapes, one_step, tmp_path, capsys):
    """Another model, data, max_steps and lr: all four named with the saved and the new value, the
    settings left as they were not named; nothing changed in the folder."""
    out = _copy(one_step, tmp_path / "run")
    before = _files(out)
    changed = TrainSettings(epochs=1, max_steps=2, **{**FAST, "lr": 2e-3})
    with pytest.raises(TrainError) as refused:
        train(shapes["held_out"], "config:tiny", out, changed, resume=True, log=io.StringIO())
    message = str(refused.value)
    assert "holds a run with other settings" in message and "\n" not in message
    assert "model: config:small_test -> config:tiny" in message
    assert "data: " in message and "train.json (4 images" in message and "held_out.json (2 images" in message
    assert "max_steps (--max-steps): 1 -> 2" in message
    assert "lr (--lr): 0.001 -> 0.002" in message
    for same in ("epochs", "batch_size", "seed", "image_size", "lr_backbone"):
        assert f"{same} (" not in message
    # one difference alone, from the CLI: --warmup is the flag of warmup_steps
    argv = ["train", "--data", str(shapes["train"]), "--model", MODEL, "--out", str(out), "--image-size", "96"]
    argv += ["--no-augment", "--max-labels", "6", "--epochs", "1", "--max-steps", "1", "--lr", "1e-3", "--resume"]
    status, err = _cli([*argv, "--warmup", "5"], capsys)
    assert status == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gdino: error:") and "warmup_steps (--warmup): 0 -> 5" in last
    assert "max_steps" not in last and "model:" not in last and "data:" not in last
    assert _files(out) == before


@pytest.mark.parametrize("how", ["max_steps", "epochs"])
def test_a_finished_run_resumed_is_left_byte_for_byte(shapes, tmp_path, how, capsys):
    """A run stopped by ``max_steps``, or through all its epochs (``save_every=1`` left ``last/`` at
    the same step as ``epoch-1/``, the later of the two), resumed with its settings, trains nothing
    and rewrites nothing, as often as it is resumed; the CLI says so and exits 0."""
    settings = TrainSettings(epochs=1, **FAST, **({"max_steps": 1} if how == "max_steps" else {"save_every": 1}))
    out = tmp_path / "run"
    first = train(shapes["train"], MODEL, out, settings, log=io.StringIO())
    before = _files(out)
    steps = 1 if how == "max_steps" else 2
    assert first.position.step == steps and ("last/model.safetensors" in before)
    for _ in range(2):
        log = io.StringIO()
        again = train(shapes["train"], MODEL, out, settings, resume=True, log=log)
        assert "has finished" in log.getvalue() and "nothing to do" in log.getvalue()
        assert again.already_finished and again.position.step == steps
        assert again.history == [json.loads(line) for line in before["history.jsonl"].decode().splitlines()]
        assert _files(out) == before
    argv = ["train", "--data", str(shapes["train"]), "--model", MODEL, "--out", str(out), "--image-size", "96"]
    argv += ["--no-augment", "--max-labels", "6", "--lr", "1e-3", "--epochs", "1", "--resume"]
    argv += ["--max-steps", "1"] if how == "max_steps" else ["--save-every", "1"]
    status, err = _cli(argv, capsys)
    assert status == 0 and "nothing to do" in err, err
    assert _files(out) == before


def test_overwrite_removes_the_old_runs_files_and_no_others(shapes, tmp_path):
    """An old run of 2 epochs, then --overwrite with 1 epoch stopped at step 1: epoch-1/ and epoch-2/
    of the old run are gone, history and settings are the new run's; a user's files in OUT, in a
    folder of their own, and in the old run's epoch-2/ stay as they were. A user's file in a
    checkpoint folder the new run writes is refused first, with nothing removed."""
    out = tmp_path / "run"
    train(shapes["train"], MODEL, out, TrainSettings(epochs=2, **FAST), log=io.StringIO())
    mine = {"notes.txt": b"my notes\n", "plots/loss.png": b"\x89PNG", "epoch-2/my_eval.json": b"{}\n"}
    for name, data in {**mine, "epoch-1/my_eval.json": b"{}\n"}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _files(out)
    new = TrainSettings(epochs=1, max_steps=1, **FAST)
    with pytest.raises(TrainError, match=r"epoch-1 holds my_eval.json, which no gdino training run wrote"):
        train(shapes["train"], MODEL, out, new, overwrite=True, log=io.StringIO())
    assert _files(out) == before
    (out / "epoch-1" / "my_eval.json").unlink()
    log = io.StringIO()
    result = train(shapes["train"], MODEL, out, new, overwrite=True, log=log)
    assert result.position.step == 1 and "removed the run" in log.getvalue()
    after = _files(out)
    assert {k: after.get(k) for k in mine} == mine  # the user's files, byte for byte
    run_files = {k for k in after if k not in mine}
    assert run_files == {f"last/{name}" for name in _checkpoint_names(out / "last")} | {
        "history.jsonl",
        "train_settings.json",
    }
    assert not (out / "epoch-1").exists() and sorted(p.name for p in (out / "epoch-2").iterdir()) == ["my_eval.json"]
    assert [json.loads(line)["step"] for line in after["history.jsonl"].decode().splitlines()] == [1]
    assert json.loads(after["train_settings.json"])["settings"]["max_steps"] == 1


def _checkpoint_names(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir())
    assert "model.safetensors" in names and "trainer_state.pt" in names
    return names


def test_a_folder_without_a_run_takes_a_run_only_where_nothing_is_in_the_way(shapes, tmp_path):
    """A user's folder named like a checkpoint (a model saved there, no resume state) or a
    history.jsonl of their own is refused, with --overwrite too (it is no run's) and with --resume;
    beside other files of theirs (and an empty folder) a run trains and leaves them as they were."""
    out = tmp_path / "mine"
    (out / "epoch-1").mkdir(parents=True)
    (out / "epoch-1" / "config.json").write_text("{}\n")
    (out / "notes.txt").write_text("my notes\n")
    settings = TrainSettings(epochs=1, max_steps=1, **FAST)
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(TrainError, match=r"epoch-1 is already there and no gdino training run wrote it"):
            train(shapes["train"], MODEL, out, settings, log=io.StringIO(), **flags)
    (out / "epoch-1" / "config.json").unlink()  # an empty epoch-1/ holds nothing to lose: no longer in the way
    (out / "history.jsonl").write_text('{"mine": 1}\n')
    with pytest.raises(TrainError, match=r"history.jsonl is already there and no gdino training run wrote it"):
        train(shapes["train"], MODEL, out, settings, log=io.StringIO())
    assert _files(out) == {"history.jsonl": b'{"mine": 1}\n', "notes.txt": b"my notes\n"}
    (out / "history.jsonl").unlink()
    result = train(shapes["train"], MODEL, out, replace(settings, save_every=1), log=io.StringIO())
    assert result.checkpoint == out / "last" and (out / "notes.txt").read_text() == "my notes\n"
