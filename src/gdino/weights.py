"""Finding and loading checkpoints: a hub id, a local Hugging Face directory, or the original .pth.

Loading is strict: every tensor the model expects must be in the file with the right shape, and
every tensor in the file must be used or be one that is knowingly ignored (see ``gdino.convert``).
The original checkpoint is read with ``torch.load(weights_only=True)``, so no code is unpickled.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GroundingDinoConfig
from .convert import StateDict, hf_to_ours, original_to_ours
from .model.grounding_dino import GroundingDino

DEFAULT_MODEL_ID = "IDEA-Research/grounding-dino-tiny"
_HUB_FILES = ["config.json", "model.safetensors", "*.json", "vocab.txt"]
_ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name"


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
    if not _HUB_ID.match(text) or text.endswith(_ORIGINAL_SUFFIXES + (".safetensors",)):
        raise CheckpointError(f"no such file or directory: {text} (nor is it a hub id like {DEFAULT_MODEL_ID!r})")
    options = HubOptions(cache_dir, revision, token, local_files_only, force_download)
    return _from_directory(_download(text, options))


@dataclass(frozen=True)
class HubOptions:
    """How to fetch a hub id: ``huggingface_hub.snapshot_download``'s arguments of the same names."""

    cache_dir: str | os.PathLike[str] | None = None
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

    fixed = {"allow_patterns": _HUB_FILES, "cache_dir": options.cache_dir, "revision": options.revision,
             "token": options.token}
    try:
        return Path(snapshot_download(repo_id, local_files_only=options.local_files_only,
                                      force_download=options.force_download, **fixed))
    except Exception as first:  # no network, hub down, or offline mode: fall back to the cache
        failure = first
        if not (options.local_files_only or options.force_download):
            try:
                return Path(snapshot_download(repo_id, local_files_only=True, **fixed))
            except Exception:
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
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(file))
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
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
    state_dict = read_state_dict(checkpoint)
    with torch.device("meta"), _skip_init():  # no random init; the file's tensors are assigned
        net = model_class(config)
    load_strict(net, state_dict, str(checkpoint.weights))
    for module in net.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
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


@contextmanager
def _skip_init() -> Iterator[None]:
    """Makes ``torch.nn.init`` a no-op while the model is built for loading.

    The weights are about to be replaced, and ``normal_`` on the meta device imports torch's
    Python meta kernels (~1 s). Scoped to the construction; not for use across threads.
    """
    names = ("normal_", "trunc_normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "constant_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
