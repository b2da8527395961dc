"""A training run's output folder (OUT): what it holds, and whether this run may write it.

An OUT holds one run. ``OUT/train_settings.json`` records what the run trains (model, data, and
the settings in ``TRAINED``); a new run into an OUT that holds one is refused unless ``resume``
(continue it, refused where a recorded setting differs, each one named) or ``overwrite`` (start
over, the old run's files removed first). Nothing the trainer writes replaces a file that no
gdino training run wrote: other files in OUT are left alone, and one in the way is refused.

``claim`` decides (refuse, resume, or overwrite) before ``gdino.training.trainer.train`` writes
anything; ``finished`` tells whether the run it resumes has anything left to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.training.samples import Dataset
from gdino.training.settings import TrainError, TrainSettings

STATE_FILE = "trainer_state.pt"
RUN_FILE = "train_settings.json"  # what the run in OUT trains (``run_record``)
HISTORY_FILE = "history.jsonl"
# The settings that change what is trained: a resume is refused where one differs from the run's.
# The others (device, save_every, max_minutes, export_original, val_limit) may change between sessions.
TRAINED = (
    "epochs",
    "batch_size",
    "lr",
    "lr_backbone",
    "lr_text",
    "weight_decay",
    "schedule",
    "lr_drop",
    "warmup_steps",
    "clip_max_norm",
    "freeze",
    "dtype",
    "seed",
    "image_size",
    "augment",
    "max_labels",
    "max_steps",
    "denoise",
    "keep_classes",
    "replay",
    "replay_threshold",
    "distill",
    "aux_loss",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
)
# ``gdino train``'s flag of each setting, for messages; the rest are ``--`` and the name with hyphens.
FLAGS = {"warmup_steps": "--warmup", "clip_max_norm": "--clip", "augment": "--no-augment"}


@dataclass
class Position:
    """Where training is: ``epoch`` and how far into its order (``offset`` samples), ``step`` in all."""

    epoch: int = 0
    offset: int = 0
    step: int = 0


def finished(position: Position, settings: TrainSettings) -> bool:
    """Whether a run at ``position`` has done all its epochs, or its ``max_steps``."""
    return position.epoch >= settings.epochs or (settings.max_steps is not None and position.step >= settings.max_steps)


def how_far(position: Position, settings: TrainSettings) -> str:
    """How far a finished run went, for messages."""
    if position.epoch >= settings.epochs:
        return f"all {settings.epochs} epochs, step {position.step}"
    return f"step {position.step}, its max_steps, in epoch {position.epoch + 1} of {settings.epochs}"


def model_identity(model: str | Path | GroundingDinoForObjectDetection) -> str:
    """What a run's ``model`` is, to compare on resume: a local path resolved, a hub id or
    ``config:NAME`` as given, a model object by the SHA-256 of its config and weights."""
    if not isinstance(model, GroundingDinoForObjectDetection):
        text = str(model)
        return str(Path(text).resolve()) if Path(text).exists() else text
    digest = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"a model object (config and weights sha256 {digest.hexdigest()[:16]})"


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """The source, image count and a SHA-256 of what is trained on: the label list and each
    sample's image (relative to the annotation file's folder, or the YOLO folder), size, boxes,
    labels, caption and phrases. A resume compares the digest, so a moved data folder resumes and
    an edited annotation file does not."""
    source = Path(dataset.source) if dataset.source else Path()
    base = source if source.is_dir() else source.parent
    digest = hashlib.sha256(json.dumps(list(dataset.names)).encode())
    for sample in dataset.samples:
        item = [
            Path(os.path.relpath(sample.image, base)).as_posix(),
            sample.width,
            sample.height,
            sample.boxes.tolist(),
            list(sample.labels),
            sample.caption,
            [[p.text, [list(span) for span in p.spans]] for p in sample.phrases],
        ]
        digest.update(json.dumps(item).encode() + b"\n")
    shown = str(source.resolve()) if dataset.source else "a Dataset"
    return {"source": shown, "images": len(dataset), "sha256": digest.hexdigest()}


def run_record(
    model: str | Path | GroundingDinoForObjectDetection, dataset: Dataset, settings: TrainSettings
) -> dict[str, Any]:
    """What ``OUT/train_settings.json`` holds: the model, the data and the ``TRAINED`` settings (as JSON reads them)."""
    trained = {k: v for k, v in asdict(settings).items() if k in TRAINED}
    record = {"gdino_train": 1, "model": model_identity(model), "data": data_identity(dataset), "settings": trained}
    loaded: dict[str, Any] = json.loads(json.dumps(record))
    return loaded


def saved_record(out: Path) -> dict[str, Any] | None:
    """The record of the run in ``out``; ``None`` when it holds none. A run of an earlier gdino has
    no ``train_settings.json``: its settings come from its newest checkpoint (its model and data are unknown)."""
    from gdino.checkpoint.saving import latest, load_state

    path = out / RUN_FILE
    if path.is_file():
        try:
            loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"unreadable": f"{path}: {e}"}
        return loaded
    found = latest(out) if out.is_dir() else None
    if found is None:
        return None
    return json.loads(json.dumps({"settings": load_state(found).get("settings", {})}, default=list))


def differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name: saved -> new"`` for each recorded model, data and ``TRAINED`` setting that differs."""
    if "unreadable" in saved:
        return [f"the saved settings cannot be read ({saved['unreadable']})"]
    found = []
    if "model" in saved and saved["model"] != new["model"]:
        found.append(f"model: {_short(saved['model'])} -> {_short(new['model'])}")
    if "data" in saved and saved["data"].get("sha256") != new["data"]["sha256"]:
        found.append(f"data: {_data_text(saved['data'])} -> {_data_text(new['data'])}")
    old, now = saved.get("settings", {}), new["settings"]
    for key in TRAINED:
        if key in old and old[key] != now[key]:
            found.append(f"{key} ({FLAGS.get(key, '--' + key.replace('_', '-'))}): {old[key]} -> {now[key]}")
    return found


def _short(text: object, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def _data_text(data: dict[str, Any]) -> str:
    return f"{_short(data.get('source'))} ({data.get('images')} images, sha256 {str(data.get('sha256'))[:12]})"


def checkpoint_folders(out: Path, done: int, settings: TrainSettings) -> list[Path]:
    """Every checkpoint folder a run after epoch ``done`` may write (or clear): ``epoch-N/`` and
    ``last/``, each with the ``.tmp`` and ``.old`` folders ``save_pretrained`` passes through."""
    names = [f"epoch-{n}" for n in range(done + 1, settings.epochs + 1)] + ["last"]
    return [out / (name + suffix) for name in names for suffix in ("", ".tmp", ".old")]


def _run_folder(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder a gdino training run wrote: a real folder with only
    checkpoint files in it, a resume state among them (or a ``.tmp`` folder, written before its
    state), or an empty folder, which holds nothing to lose."""
    from gdino.checkpoint.saving import foreign_entries

    if path.is_symlink() or not path.is_dir() or foreign_entries(path):
        return False
    return (path / STATE_FILE).is_file() or path.name.endswith(".tmp") or not any(path.iterdir())


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _refuse_existing(paths: Sequence[Path]) -> None:
    """In an OUT that holds no run, nothing the run writes may be there already (an empty folder may)."""
    there = [p for p in paths if (p.exists() or p.is_symlink()) and not _empty_folder(p)]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise TrainError(
            f"{there[0]}{more} is already there and no gdino training run wrote it; move it, or use another --out"
        )


def refuse_foreign(paths: Sequence[Path]) -> None:
    """Each checkpoint folder the run will replace must be one a gdino training run wrote."""
    from gdino.checkpoint.saving import foreign_entries

    for path in paths:
        if (path.exists() or path.is_symlink()) and not _run_folder(path):
            what = (
                f"holds {', '.join(foreign_entries(path)[:3]) or 'no resume state'}, "
                if path.is_dir() and not path.is_symlink()
                else "is not a folder, "
            )
            raise TrainError(
                f"{path} {what}which no gdino training run wrote, and the run would replace it; "
                "move it, or use another --out"
            )


def remove_run(out: Path, log: IO[str]) -> int:
    """Deletes the files of the run in ``out``: its settings, history and checkpoint folders (the
    checkpoint files in them; a folder that holds other files too keeps those). Returns how many."""
    from gdino.checkpoint.saving import CHECKPOINT_FILES, CHECKPOINT_NAME

    removed = 0
    for name in (RUN_FILE, HISTORY_FILE):
        for path in [out / name, *out.glob(f".{name}.*.tmp")]:  # the second: a write_atomic cut short
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
    for folder in sorted(out.iterdir()):
        stem = folder.name.removesuffix(".tmp").removesuffix(".old")
        if not CHECKPOINT_NAME.fullmatch(stem) or folder.is_symlink() or not folder.is_dir():
            continue
        if not (folder / STATE_FILE).is_file() and not folder.name.endswith(".tmp"):
            continue  # e.g. a model someone saved there: no training run wrote it
        for path in folder.iterdir():
            if path.name in CHECKPOINT_FILES and path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        if any(folder.iterdir()):
            print(f"train: kept {folder} (it holds files no gdino training run wrote)", file=log, flush=True)
        else:
            folder.rmdir()
    return removed


def claim(
    out: Path, record: dict[str, Any], settings: TrainSettings, resume: bool, overwrite: bool, log: IO[str]
) -> tuple[Path | None, dict[str, Any] | None]:
    """Decides what to do with ``out``; returns the checkpoint to resume from and its state (or
    ``None, None``: start afresh). Changes nothing in ``out`` unless ``overwrite`` (the old run's
    files are then removed), and nothing at all when it refuses.

    Raises:
        TrainError: ``out`` holds a run, without ``resume`` or ``overwrite``; the run's settings differ
            (with ``resume``); a file in the way that no gdino training run wrote.
    """
    from gdino.checkpoint.saving import latest, load_state

    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is not a folder")
    saved = saved_record(out)
    if saved is None:
        _refuse_existing([out / RUN_FILE, out / HISTORY_FILE, *checkpoint_folders(out, 0, settings)])
        if resume:
            print(f"train: nothing to resume in {out}; starting afresh", file=log, flush=True)
        return None, None
    if resume:
        changed = differences(saved, record)
        if changed:
            raise TrainError(
                f"{out} holds a run with other settings: {'; '.join(changed)}; resume it with its settings, "
                "give --overwrite to start over, or use another --out"
            )
        found = latest(out)
        if found is None:
            print(f"train: no checkpoint in {out} yet; starting the run afresh", file=log, flush=True)
            return None, None
        return found, load_state(found)
    if not overwrite:
        raise TrainError(
            f"{out} holds a training run; give --resume to continue it, --overwrite to start over "
            "(removing its checkpoints and history), or use another --out"
        )
    refuse_foreign(checkpoint_folders(out, 0, settings))
    removed = remove_run(out, log)
    print(f"train: --overwrite: removed the run in {out} ({removed} files)", file=log, flush=True)
    return None, None


def write_history(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """``OUT/history.jsonl`` as the records of the finished epochs (none: no file)."""
    from gdino.utils.files import write_atomic

    path = out / HISTORY_FILE
    if history:
        write_atomic(path, "".join(json.dumps(record) + "\n" for record in history))
    else:
        path.unlink(missing_ok=True)
