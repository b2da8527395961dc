"""Loading a SAM 2.1 checkpoint strictly: a Hugging Face directory or file, or the original ``.pt``.

A directory holding ``config.json`` and ``model.safetensors`` is the Hugging Face layout (transformers'
``Sam2Model`` or ``Sam2VideoModel``); ``sam2.1_hiera_*.pt`` (``{"model": state_dict}``) the original's,
read with ``torch.load(weights_only=True)`` so no code is unpickled. A file with no ``config.json``
beside it is built as the published size its trunk's tensors show. Every tensor the model expects
must be in the file with its shape, and every tensor in the file must be used or be one of the
video model's, which are named in ``gdino.checkpoint.convert_sam2`` and reported in one log line.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from gdino.checkpoint.convert_sam2 import StateDict, hf_to_ours, layout, original_to_ours
from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.model import Sam2
from gdino.utils.hub import CheckpointError, resolve

logger = logging.getLogger(__name__)

PRESETS = {
    "tiny": Sam2Config.tiny,
    "small": Sam2Config.small,
    "base_plus": Sam2Config.base_plus,
    "large": Sam2Config.large,
}
_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")


def load_sam2(
    path_or_dir: str | os.PathLike[str],
    *,
    config: Sam2Config | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Sam2:
    """The model in eval mode with the checkpoint's weights, loaded strictly.

    Args:
        path_or_dir: a directory (``config.json`` and ``model.safetensors``, or one original ``.pt``),
            a ``.safetensors`` file or an original ``.pt`` / ``.pth``.
        config: the architecture; by default the directory's ``config.json``, else the published
            size the tensors show.
        device, dtype: where and in which precision the model is put.

    Raises:
        CheckpointError: the path is missing, the file unreadable or not SAM 2's, config.json is
            refused (the key is named), or tensors are missing, unknown or of the wrong shape
            (each is named).
    """
    config, tensors = read_sam2(path_or_dir, config)
    model = Sam2(config)
    check_fit(model, tensors, Path(path_or_dir))
    model.load_state_dict(tensors, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def read_sam2(path_or_dir: str | os.PathLike[str], config: Sam2Config | None = None) -> tuple[Sam2Config, StateDict]:
    """The checkpoint's architecture and its tensors under our names (no model is built)."""
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}")
    checkpoint = resolve(path)
    tensors = convert(read_tensors(checkpoint.weights), checkpoint.weights)
    if config is None:
        json_file = checkpoint.directory / "config.json" if checkpoint.directory is not None else None
        if json_file is not None and json_file.is_file():
            config = read_config(json_file)
        else:
            config = config_from_tensors(tensors, str(checkpoint.weights))
    return config, tensors


def convert(raw: StateDict, file: Path) -> StateDict:
    """A file's tensors under our names, whichever layout it has; the video model's are skipped and
    reported in one log line.

    Raises:
        CheckpointError: the file holds no SAM 2 trunk, or tensors no rule places (named).
    """
    found = layout(raw)
    if found is None:
        examples = ", ".join(sorted(raw)[:3]) or "no tensors"
        raise CheckpointError(
            f"{file} is not a SAM 2 checkpoint: its tensors ({examples}, ...) hold no Hiera trunk, "
            "neither transformers' vision_encoder.backbone. nor the original's image_encoder.trunk."
        )
    converted = hf_to_ours(raw) if found == "hf" else original_to_ours(raw)
    if converted.unknown:
        raise CheckpointError(f"{file} has tensors that fit no part of SAM 2: {_names(converted.unknown)}")
    if converted.ignored:
        groups = Counter(n.split(".")[0] for n in converted.ignored)
        logger.info(
            "%s: %d tensors of the video model (%s) are not used by the image model and were skipped",
            file,
            len(converted.ignored),
            ", ".join(f"{g} {n}" for g, n in sorted(groups.items())),
        )
    return converted.tensors


def read_tensors(file: Path) -> StateDict:
    """A file's tensors under its own names (an original file's ``"model"`` dict)."""
    raw: Any
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(file))
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (safetensors and torch.load raise many types for a bad file)
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{file} does not hold a state dict of tensors")
    return raw


def read_config(file: Path) -> Sam2Config:
    """A Hugging Face ``config.json``; a refused one is a ``CheckpointError`` naming the file and the key."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    try:
        return Sam2Config.from_hf_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def trunk_shape(tensors: StateDict) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int]:
    """What the trunk's tensors show: widths and blocks per stage, the background position table's
    size and the window table's side."""
    try:
        blocks = 1 + max(int(m[1]) for n in tensors if (m := _BLOCK.match(n)))
        starts = [i for i in range(blocks) if f"image_encoder.trunk.blocks.{i}.proj.weight" in tensors]
        bounds = [0, *starts, blocks]
        stages = tuple(b - a for a, b in itertools.pairwise(bounds))
        widths = tuple(tensors[f"image_encoder.trunk.blocks.{b - 1}.norm2.weight"].shape[0] for b in bounds[1:])
        background = tuple(tensors["image_encoder.trunk.pos_embed"].shape[2:])
        window = tensors["image_encoder.trunk.pos_embed_window"].shape[-1]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the trunk's tensors are incomplete ({e})") from None
    return widths, stages, background, window


def config_from_tensors(tensors: StateDict, where: str = "the checkpoint") -> Sam2Config:
    """The published size whose trunk the tensors show (the file holds no heads or windows to read more).

    Raises:
        CheckpointError: no published size has this trunk.
    """
    shape = trunk_shape(tensors)
    for build in PRESETS.values():
        preset = build()
        h = preset.hiera
        if shape == (h.embed_dims, h.stages, h.window_pos_embed_bkg_spatial_size, h.window_spec[0]):
            return preset
    widths, stages, background, window = shape
    raise CheckpointError(
        f"{where} has a Hiera trunk of widths {list(widths)}, blocks {list(stages)}, position table "
        f"{list(background)} and window {window}: none of the published sizes ({', '.join(PRESETS)}); "
        "give its config.json (or config=)"
    )


def check_fit(model: Sam2, tensors: StateDict, where: Path) -> None:
    """Every tensor the model has, with its shape, and no other.

    Raises:
        CheckpointError: naming the missing, unexpected and misshapen tensors.
    """
    expected = model.state_dict()
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    misshapen = [
        f"{n} {tuple(t.shape)} (the model's is {tuple(expected[n].shape)})"
        for n, t in tensors.items()
        if n in expected and t.shape != expected[n].shape
    ]
    problems = [
        f"{label}: {_names(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
        if names
    ]
    if problems:
        raise CheckpointError(f"{where} does not fit the SAM 2 model built for it; " + "; ".join(problems))


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
