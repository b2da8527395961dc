"""Finding and loading checkpoints: a hub id, a local Hugging Face directory, or the original .pth.

Loading is strict: every tensor the model expects must be in the file with the right shape, and
every tensor in the file must be used or be one that is knowingly ignored (see ``gdino.checkpoint.convert``).
The original checkpoint is read with ``torch.load(weights_only=True)``, so no code is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DEFAULT_MODEL_ID, GroundingDinoConfig
from ..model.grounding_dino import GroundingDino
from .convert import StateDict, hf_to_ours, original_to_ours

_HUB_FILES = ["config.json", "model.safetensors", "*.json", "vocab.txt"]
_ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name"
PACKAGED_MODELS: dict[str, str] = {
    "gdino-shapes": "the shapes model, trained from scratch by scripts/train_shapes.sh (coloured shapes only)",
}
"""Models shipped inside the package, by name: they load with no network."""


class CheckpointError(ValueError):
    """A checkpoint could not be found or does not fit the model; the message says which and why."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a model's files are.

    Attributes:
        weights: the weights file (model.safetensors, pytorch_model.bin or an original .pth).
        layout: "hf" or "original".
        directory: the directory holding config.json and tokenizer files, if any.
    """

    weights: Path
    layout: str
    directory: Path | None


def resolve(
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Checkpoint:
    """Turns a hub id, a directory or a checkpoint file into a ``Checkpoint``.

    The hub options (``cache_dir``, ``revision``, ``token``, ``local_files_only``,
    ``force_download``) are ``huggingface_hub.snapshot_download``'s; local paths ignore them.

    Raises:
        CheckpointError: the path does not exist, or the hub cannot be reached and nothing is cached.
    """
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors":
            return Checkpoint(path, "hf", path.parent)
        return Checkpoint(path, "original", None)
    if path.is_dir():
        return _from_directory(path)
    text = str(model)
    if text in PACKAGED_MODELS:  # a local path of the same name won above
        return _from_directory(packaged_model_dir(text))
    if not _HUB_ID.match(text) or text.endswith((*_ORIGINAL_SUFFIXES, ".safetensors")):
        raise CheckpointError(
            f"no such file or directory: {text} (nor is it a hub id like {DEFAULT_MODEL_ID!r}"
            f" or a packaged model: {', '.join(PACKAGED_MODELS)})"
        )
    cache = cache_dir if cache_dir is None or isinstance(cache_dir, (str, Path)) else Path(cache_dir)
    options = HubOptions(cache, revision, token, local_files_only, force_download)
    return _from_directory(_download(text, options))


def packaged_model_dir(name: str) -> Path:
    """The directory of a model shipped in the package (``PACKAGED_MODELS``).

    Raises:
        CheckpointError: ``name`` is not a packaged model, or its files are missing from this install.
    """
    if name not in PACKAGED_MODELS:
        raise CheckpointError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED_MODELS)}")
    directory = Path(__file__).resolve().parent.parent / "data" / name
    if not (directory / "model.safetensors").is_file():
        raise CheckpointError(f"the packaged model {name!r} is missing from this install ({directory})")
    return directory


@dataclass(frozen=True)
class HubOptions:
    """How to fetch a hub id: ``huggingface_hub.snapshot_download``'s arguments of the same names."""

    cache_dir: str | Path | None = None
    revision: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False


def _from_directory(path: Path) -> Checkpoint:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return Checkpoint(path / name, "hf", path)
    originals = sorted(p for p in path.iterdir() if p.suffix in _ORIGINAL_SUFFIXES)
    if len(originals) == 1:
        return Checkpoint(originals[0], "original", path)
    raise CheckpointError(
        f"{path} holds no model.safetensors, pytorch_model.bin or single original .pth checkpoint"
    )


def _download(repo_id: str, options: HubOptions) -> Path:
    """The snapshot directory of ``repo_id``; from the cache when the hub cannot be reached.

    With ``force_download`` there is no falling back to the cache, and with ``local_files_only``
    there is nothing to fall back from.
    """
    from huggingface_hub import snapshot_download  # imported here: only the hub path needs it

    def fetch(local_files_only: bool, force_download: bool) -> Path:
        folder = snapshot_download(
            repo_id, allow_patterns=_HUB_FILES, revision=options.revision, token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=local_files_only, force_download=force_download,
        )  # fmt: skip
        return Path(folder)

    try:
        return fetch(options.local_files_only, options.force_download)
    except Exception as first:  # noqa: BLE001 (no network, hub down, or offline mode: fall back to the cache)
        failure = first
        if not (options.local_files_only or options.force_download):
            try:
                return fetch(local_files_only=True, force_download=False)
            except Exception:  # noqa: BLE001 (not in the cache either, whatever the hub's error type)
                pass
    at = f" at revision {options.revision!r}" if options.revision else ""
    where = ("is not in the local cache (local_files_only=True)" if options.local_files_only else
             f"could not be downloaded from the Hugging Face Hub ({type(failure).__name__})"
             + ("" if options.force_download else " and is not in the local cache"))
    raise CheckpointError(
        f"{repo_id!r}{at} {where}; pass a local directory (config.json, model.safetensors) or an original "
        f"groundingdino_swint_ogc.pth file instead, e.g. --model ./grounding-dino-tiny"
    ) from None


def read_state_dict(checkpoint: Checkpoint) -> StateDict:
    """Reads the weights file and converts its names to ours (no model needed)."""
    file = checkpoint.weights
    raw: Any
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(file))
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (safetensors and torch.load raise many types for a bad file)
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if checkpoint.layout == "original" and isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    looks_hf = any(k.startswith("model.") for k in raw)
    converted, unknown = hf_to_ours(raw) if looks_hf else original_to_ours(raw)
    if unknown:
        raise CheckpointError(f"{file} has tensors that fit no part of the model: {_names(unknown)}")
    return converted


def read_config(checkpoint: Checkpoint) -> GroundingDinoConfig:
    """The checkpoint's config.json if it has one, else the grounding-dino-tiny architecture."""
    if checkpoint.directory is not None and (checkpoint.directory / "config.json").is_file():
        with open(checkpoint.directory / "config.json") as f:
            return GroundingDinoConfig.from_hf_dict(json.load(f))
    return GroundingDinoConfig.tiny()


def load_strict(model: torch.nn.Module, state_dict: StateDict, source: str = "checkpoint") -> None:
    """Copies ``state_dict`` into ``model``; every name and shape must match, else lists the differences."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {_names(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)


def load_model(
    model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    model_class: type[GroundingDino] = GroundingDino,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    box_refinement: str | None = None,
) -> tuple[GroundingDino, Checkpoint]:
    """Builds the model for a checkpoint and loads its weights strictly, in eval mode.

    ``cache_dir``, ``revision``, ``token``, ``local_files_only`` and ``force_download`` are the
    hub options of :func:`resolve`. ``box_refinement`` ("original" or "transformers", see
    ``config.BOX_REFINEMENTS``) defaults to the checkpoint's layout: "original" for an original
    ``.pth``, whose weights the original code trained, and "transformers" for the Hugging Face
    layout, so it gives transformers' outputs.
    """
    checkpoint = resolve(model, cache_dir, revision=revision, token=token, local_files_only=local_files_only,
                         force_download=force_download)
    default = "original" if checkpoint.layout == "original" else "transformers"
    config = read_config(checkpoint).with_box_refinement(box_refinement or default)
    # A checkpoint stored in half precision (the packaged gdino-shapes, fp16 uploads) loads as float32
    # like any other; ``dtype`` alone decides the precision the model runs in.
    state_dict = {k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
                  for k, v in read_state_dict(checkpoint).items()}
    with torch.device("meta"):  # no memory and no random init: the file's tensors are assigned
        net = model_class(config, init_weights=False)
    load_strict(net, state_dict, str(checkpoint.weights))
    for module in net.modules():  # buffers computed from the config, not stored in checkpoints
        reset = getattr(module, "reset_buffers", None)
        if callable(reset):
            reset()
    net.eval()
    if device is not None:
        net = net.to(device=device)
    if dtype is not None and dtype != torch.float32:
        _warn_if_emulated(dtype, torch.device(device or "cpu"))
        net.set_precision(dtype)
        # The parts kept in float32 still view the memory-mapped file, which keeps all of it
        # resident; owning copies let it go.
        for param in net.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.clone()
    return net, checkpoint


# CPU flags (Linux /proc/cpuinfo) of native instructions for each reduced precision.
_NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def _warn_if_emulated(dtype: torch.dtype, device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Warns (and returns True) when ``dtype`` on this CPU has no native instructions.

    Without them, oneDNN converts to float32 around every operation and the model runs slower
    than in float32, which is the opposite of what asking for bf16 or fp16 is for.
    """
    flags_wanted = _NATIVE_CPU_FLAGS.get(dtype)
    if device.type != "cpu" or flags_wanted is None:
        return False
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return False  # not Linux: nothing to go by
    if flags is None or any(flag in flags for flag in flags_wanted):
        return False
    warnings.warn(
        f"{dtype} on this CPU is emulated (no {' or '.join(flags_wanted)}) and will likely be slower "
        "than float32; pass dtype=torch.float32 (--dtype fp32) unless memory is what you need to save",
        stacklevel=3,
    )
    return True


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
