"""Finding and loading checkpoints: a hub id, a local Hugging Face directory, or the original .pth.

Loading is strict: every tensor the model expects must be in the file with the right shape, and
every tensor in the file must be used or be one that is knowingly ignored (see ``gdino.checkpoint.convert``).
The original checkpoint is read with ``torch.load(weights_only=True)``, so no code is unpickled.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from gdino.checkpoint.architecture import original_config
from gdino.checkpoint.convert import ConversionError, StateDict, hf_to_ours, original_to_ours
from gdino.checkpoint.convert_mmdet import looks_mmdet, mmdet_config, mmdet_to_ours
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino
from gdino.utils.hub import DEFAULT_MODEL_ID, Checkpoint, CheckpointError, resolve


def read_state_dict(checkpoint: Checkpoint, config: GroundingDinoConfig | None = None) -> StateDict:
    """Reads the weights file and converts its names to ours (no model needed).

    ``config`` says whether the decoder's heads are shared (by default the checkpoint's own, see
    ``read_config``).
    """
    raw = read_tensors(checkpoint)
    config = config if config is not None else read_config(checkpoint, raw)
    return convert_tensors(raw, config, checkpoint.weights)


def convert_tensors(raw: StateDict, config: GroundingDinoConfig, file: Path) -> StateDict:
    """A file's tensors under our names, for ``config`` (whether its decoder heads are shared)."""
    shared = (config.share_box_heads, config.share_class_heads)
    try:
        if looks_mmdet(raw):
            converted, unknown = mmdet_to_ours(raw, *shared)
        elif any(k.startswith("model.") for k in raw):
            converted, unknown = hf_to_ours(raw, *shared)
        else:
            converted, unknown = original_to_ours(raw, *shared)
    except ConversionError as e:
        raise CheckpointError(f"{file}: {e}") from None
    if unknown:
        raise CheckpointError(f"{file} has tensors that fit no part of the model: {_names(unknown)}")
    return converted


def read_tensors(checkpoint: Checkpoint) -> StateDict:
    """The weights file's tensors under the file's own names (an original file's ``"model"`` dict)."""
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
    if checkpoint.layout == "original" and isinstance(
        raw, dict
    ):  # IDEA's {"model": ...}, mmdetection's {"state_dict": ...}
        raw = next((raw[k] for k in ("model", "state_dict") if isinstance(raw.get(k), dict)), raw)
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return raw


def read_config(checkpoint: Checkpoint, raw: StateDict | None = None) -> GroundingDinoConfig:
    """The checkpoint's config.json if it has one; else, for an original ``.pth``, the architecture
    its tensors show (``raw``, read from the file when not given; ``gdino.checkpoint.architecture``).

    Raises:
        CheckpointError: config.json cannot be read, is not JSON, or holds a value the model cannot
            be built with (the message names the file and the key); an original file that is not a
            Grounding DINO (what it holds is named).
    """
    if checkpoint.directory is None or not (checkpoint.directory / "config.json").is_file():
        tensors = raw if raw is not None else read_tensors(checkpoint)
        try:
            if looks_mmdet(tensors):  # MM-Grounding-DINO and LLMDet as mmdetection saves them
                return mmdet_config(tensors)
            return original_config({k.removeprefix("module."): v for k, v in tensors.items()})
        except ValueError as e:
            raise CheckpointError(f"{checkpoint.weights}: {e}") from None
    path = checkpoint.directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    try:
        return GroundingDinoConfig.from_hf_dict(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


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
    checkpoint = resolve(
        model,
        cache_dir,
        revision=revision,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    default = "original" if checkpoint.layout == "original" else "transformers"
    raw = read_tensors(checkpoint)
    config = read_config(checkpoint, raw).with_box_refinement(box_refinement or default)
    # A checkpoint stored in half precision (the packaged gdino-shapes, fp16 uploads) loads as float32
    # like any other; ``dtype`` alone decides the precision the model runs in.
    state_dict = {
        k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in convert_tensors(raw, config, checkpoint.weights).items()
    }
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
NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def _warn_if_emulated(dtype: torch.dtype, device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Warns (and returns True) when ``dtype`` on this CPU has no native instructions.

    Without them, oneDNN converts to float32 around every operation and the model runs slower
    than in float32, which is the opposite of what asking for bf16 or fp16 is for.
    """
    flags_wanted = NATIVE_CPU_FLAGS.get(dtype)
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
