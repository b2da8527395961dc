"""WiSE-FT (Wortsman et al. 2022): a checkpoint between a base model and its fine-tune, by weights.

    from gdino.checkpoint.merge import merge_checkpoints
    merge_checkpoints("gdino-shapes", "runs/mine/epoch-6", alpha=0.5, out="merged")

Every tensor of the result is ``(1 - alpha) * base + alpha * tuned`` (alpha 0 gives the base
model, 1 the fine-tune), in float32, under the same names. Fine-tuning from a base model tends to
stay in one basin of the loss, where points between the two keep much of what each knows: the
base model's vocabulary and the fine-tune's classes. The result is a plain checkpoint in the
Hugging Face layout (``config.json`` and the tokenizer and processor files of TUNED) that gdino
and transformers load.

Both must be one architecture (their configs may differ only in ``NON_ARCHITECTURAL`` keys:
recommended thresholds, loss and matching weights, which the result takes from TUNED) and one
vocabulary, with the same tensors of the same shapes; anything else is refused with the
differences named, before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gdino.checkpoint.convert import StateDict
from gdino.checkpoint.loading import load_strict, read_config, read_state_dict
from gdino.checkpoint.saving import CLASSES_FILE, classes_file, read_classes_file, save_pretrained
from gdino.models.grounding_dino.config import TRAINING_FIELDS, GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino
from gdino.processing.processor import GroundingDinoProcessor
from gdino.utils.hub import Checkpoint, resolve

# config.json keys that do not change what the weights mean: they may differ between the two.
NON_ARCHITECTURAL = frozenset({"gdino_defaults", *TRAINING_FIELDS})
# The tokenizer and processor files the result takes from TUNED, where it has them.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "tokenizer.json",
)


class MergeError(ValueError):
    """The two checkpoints cannot be merged (or the output cannot be written); the message says why."""


def architecture_differences(base: GroundingDinoConfig, tuned: GroundingDinoConfig) -> list[str]:
    """``"key: base -> tuned"`` for each architectural config.json key (nested ones dotted) that differs."""
    a, b = _flat(base.to_hf_dict()), _flat(tuned.to_hf_dict())
    keys = [k for k in dict.fromkeys([*a, *b]) if k.split(".")[0] not in NON_ARCHITECTURAL]
    return [f"{k}: {a.get(k, '(none)')} -> {b.get(k, '(none)')}" for k in keys if a.get(k) != b.get(k)]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def vocabulary_difference(base: GroundingDinoProcessor, tuned: GroundingDinoProcessor) -> str | None:
    """What differs between the two tokenizers' vocabularies (size, first tokens apart), or None."""
    a, b = base.tokenizer._tok.get_vocab(), tuned.tokenizer._tok.get_vocab()
    if a == b:
        return None
    apart = sorted(set(a.items()) ^ set(b.items()), key=lambda item: item[1])[:3]
    shown = ", ".join(f"{token!r} ({index})" for token, index in apart)
    return f"{len(a)} tokens -> {len(b)} tokens; first apart: {shown}"


def interpolate(base: StateDict, tuned: StateDict, alpha: float) -> StateDict:
    """``(1 - alpha) * base + alpha * tuned`` per tensor, in float32 (alpha 0 and 1 give the
    inputs' values exactly); a tensor that is not floating point must be equal in both.

    Raises:
        MergeError: alpha outside [0, 1], names or shapes that differ, unequal integer tensors.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha must be between 0 and 1, not {alpha}")
    missing, extra = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    shapes = [
        f"{k} {tuple(base[k].shape)} -> {tuple(tuned[k].shape)}"
        for k in base
        if k in tuned and base[k].shape != tuned[k].shape
    ]
    problems = [
        f"{what} {len(names)}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
        for what, names in (("only in BASE", missing), ("only in TUNED", extra), ("shapes differ", shapes))
        if names
    ]
    if problems:
        raise MergeError("the checkpoints' tensors differ: " + "; ".join(problems))
    merged: StateDict = {}
    for key, b in base.items():
        t = tuned[key]
        if not (b.is_floating_point() and t.is_floating_point()):
            if not torch.equal(b, t):
                raise MergeError(f"{key} ({b.dtype}) is not a floating-point tensor and differs between the two")
            merged[key] = t.clone()
            continue
        merged[key] = (1.0 - alpha) * b.float() + alpha * t.float()
    return merged


def _checkpoint(
    spec: str | os.PathLike[str], role: str
) -> tuple[Checkpoint, GroundingDinoConfig, GroundingDinoProcessor]:
    checkpoint = resolve(spec)
    try:
        return checkpoint, read_config(checkpoint), GroundingDinoProcessor.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise MergeError(f"{role} {spec}: {e}") from None


def check_out(out: Path, inputs: list[Checkpoint]) -> None:
    """``out`` must not exist, or be an empty folder, and be none of the inputs (nor hold one).

    Raises:
        MergeError: it is a file, a folder with something in it, or an input.
    """
    for checkpoint in inputs:
        for path in (checkpoint.weights, checkpoint.directory):
            if path is not None and (path.resolve() == out.resolve() or out.resolve() in path.resolve().parents):
                raise MergeError(f"--out {out} is one of the inputs ({path}); it would be overwritten")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MergeError(f"--out {out} is already there and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise MergeError(f"--out {out} is not empty; nothing is ever written over, so choose a new or empty folder")


def merge_checkpoints(
    base: str | os.PathLike[str], tuned: str | os.PathLike[str], alpha: float, out: str | os.PathLike[str]
) -> Path:
    """Writes ``(1 - alpha) * base + alpha * tuned`` to ``out`` as a Hugging Face checkpoint with
    TUNED's config, tokenizer and processor files, and the two label lists (``classes.txt``) joined.

    Inputs are what ``from_pretrained`` takes (hub ids, packaged names such as ``gdino-shapes``,
    directories, weight files).

    Raises:
        MergeError: alpha outside [0, 1], other architectures or vocabularies, tensors that differ
            in names or shapes, an ``out`` that is not new or empty or that is an input; all
            before anything is written.
        CheckpointError: an input that cannot be found or read.
    """
    out = Path(out)
    if not 0.0 <= alpha <= 1.0:
        raise MergeError(f"alpha must be between 0 and 1, not {alpha}")
    (base_ckpt, base_config, base_proc), (tuned_ckpt, tuned_config, tuned_proc) = (
        _checkpoint(base, "BASE"),
        _checkpoint(tuned, "TUNED"),
    )
    check_out(out, [base_ckpt, tuned_ckpt])
    differ = architecture_differences(base_config, tuned_config)
    if differ:
        raise MergeError(f"BASE and TUNED are different architectures: {'; '.join(differ[:5])}")
    vocabulary = vocabulary_difference(base_proc, tuned_proc)
    if vocabulary:
        raise MergeError(f"BASE and TUNED have different vocabularies: {vocabulary}")
    merged = interpolate(read_state_dict(base_ckpt, base_config), read_state_dict(tuned_ckpt, tuned_config), alpha)
    with torch.device("meta"):  # no memory and no random init: the merged tensors are assigned
        model = GroundingDino(tuned_config, init_weights=False)
    load_strict(model, merged, "the merged weights")
    classes = _classes(base_ckpt, tuned_ckpt)
    with _staging(out) as staging:
        folder = save_pretrained(
            model, staging / "merged", tuned_proc, files={CLASSES_FILE: classes_file(classes)} if classes else None
        )
        for name in PROCESSOR_FILES:
            if tuned_ckpt.directory is not None and (tuned_ckpt.directory / name).is_file():
                shutil.copyfile(tuned_ckpt.directory / name, folder / name)
        (folder / "merge.json").write_text(
            json.dumps({"base": str(base), "tuned": str(tuned), "alpha": alpha}, indent=2) + "\n"
        )
        os.replace(folder, out)  # onto a new name or an empty folder: never over anything
    return out


def _classes(*checkpoints: Checkpoint) -> list[str]:
    """The label lists the checkpoints' training runs recorded (``classes.txt``), joined in order."""
    names: dict[str, None] = {}
    for checkpoint in checkpoints:
        names.update(dict.fromkeys(read_classes_file(checkpoint.directory)))
    return list(names)


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` (a name no one has), removed afterwards with what is left in it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
