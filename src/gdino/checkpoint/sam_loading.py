"""Loading SAM and SAM-HQ checkpoints strictly, from local files.

``load_sam(path)`` takes a Hugging Face directory (``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``, as transformers' ``SamModel`` / ``SamHQModel`` save them), a weights file
alone, or an original repository's ``.pth`` (``sam_vit_b_01ec64.pth``, ``sam_hq_vit_l.pth``, ...;
read with ``torch.load(weights_only=True)``, so no code is unpickled). The layout is told from
the tensors' names, not the file's. The architecture comes from an explicit ``config``, else the
directory's ``config.json``, else the tensors themselves (``convert_sam.config_from_tensors``).

Loading is strict: every tensor the model expects must be in the file with the right shape, and
every tensor in the file must be used or knowingly ignored (``convert_sam``). A file of another
family (Grounding DINO, SAM 2) is refused with what it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gdino.checkpoint.convert import ConversionError
from gdino.checkpoint.convert_sam import StateDict, config_from_tensors, hf_to_ours, original_to_ours
from gdino.checkpoint.loading import load_strict, read_tensors
from gdino.models.sam.config import REFERENCES, SamConfig
from gdino.models.sam.model import Sam
from gdino.utils.hub import Checkpoint, CheckpointError

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")

# Names that only another model family's checkpoints hold (after a "module." prefix is removed).
_FAMILIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "SAM 2",
        (
            "image_encoder.trunk.",
            "sam_mask_decoder.",
            "sam_prompt_encoder.",
            "memory_attention.",
            "memory_encoder.",
            "maskmem_tpos_enc",
            "vision_encoder.backbone.",
            "no_memory_embedding",
        ),
    ),
    ("Grounding DINO", ("backbone.0.", "bert.", "transformer.", "model.backbone.", "model.text_backbone.")),
]
_LAYOUTS = {"vision_encoder.": "hf", "image_encoder.": "original"}


def load_sam(
    path: str | os.PathLike[str],
    *,
    config: SamConfig | None = None,
    reference: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Sam:
    """Builds the model for a checkpoint and loads its weights strictly, in eval mode.

    Args:
        path: a directory or a weights file (see the module docstring).
        config: the architecture, instead of the directory's ``config.json`` or the tensors'.
        reference: "original" or "transformers" (``gdino.models.sam.config.REFERENCES``): whose
            arithmetic to follow where the two differ. By default the layout's: "transformers" for
            the Hugging Face layout, so it gives transformers' outputs, and "original" for an
            original file, whose weights that code trained. An explicit ``config`` is kept as it is
            unless ``reference`` is given.
        device, dtype: where and in what precision the model runs (default CPU, float32).

    Raises:
        CheckpointError: the path does not exist or cannot be read; a file of another family; a
            config.json that cannot be read or built; tensors that do not fit (named).
    """
    if reference is not None and reference not in REFERENCES:
        raise ValueError(f"reference must be one of {sorted(REFERENCES)}, not {reference!r}")
    weights, directory = find_weights(Path(path).expanduser())
    raw = read_tensors(Checkpoint(weights, "hf" if weights.suffix == ".safetensors" else "original", directory))
    layout = sam_layout(raw, weights)
    try:
        converted, unknown = (hf_to_ours if layout == "hf" else original_to_ours)(raw)
    except ConversionError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    if unknown:
        raise CheckpointError(f"{weights} has tensors that fit no part of SAM: {_names(unknown)}")
    if config is None:
        config = _read_config(directory, converted, weights)
        reference = reference or ("transformers" if layout == "hf" else "original")
    if reference is not None:
        config = config.with_reference(reference)
    # A checkpoint stored in half precision loads as float32 like any other; ``dtype`` alone decides.
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in converted.items()}
    with torch.device("meta"):  # no memory and no random init: the file's tensors are assigned
        model = Sam(config)
    load_strict(model, state_dict, str(weights))
    model.eval()
    return model.to(device=device, dtype=dtype) if device is not None or dtype is not None else model


def find_weights(path: Path) -> tuple[Path, Path | None]:
    """The weights file of a path, and the directory that may hold its ``config.json`` (None for an
    original file named alone: its architecture is read from its tensors).

    Raises:
        CheckpointError: no such path, or a directory without exactly one weights file.
    """
    if path.is_file():  # a Hugging Face weights file keeps its folder's config.json; an original file has none
        return path, path.parent if path.name in HF_WEIGHTS else None
    if not path.is_dir():
        raise CheckpointError(f"no such file or directory: {path}")
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return path / name, path
    originals = sorted(p for p in path.iterdir() if p.suffix in ORIGINAL_SUFFIXES and p.is_file())
    if len(originals) == 1:
        return originals[0], path
    found = ", ".join(p.name for p in originals) or "none"
    raise CheckpointError(
        f"{path} holds no {' or '.join(HF_WEIGHTS)} and not exactly one original checkpoint "
        f"({', '.join(ORIGINAL_SUFFIXES)}; found {found})"
    )


def sam_layout(raw: StateDict, file: Path) -> str:
    """ "hf" or "original", from the tensors' names.

    Raises:
        CheckpointError: the tensors are another family's, or no SAM model's.
    """
    names = [name.removeprefix("module.") for name in raw]
    for family, prefixes in _FAMILIES:
        if hits := [n for n in names if n.startswith(prefixes)]:
            raise CheckpointError(
                f"{file} is a {family} checkpoint ({len(raw)} tensors, such as {_names(hits, 3)}), not SAM or "
                "SAM-HQ; load it with its own model"
            )
    for prefix, layout in _LAYOUTS.items():
        if any(n.startswith(prefix) for n in names):
            return layout
    raise CheckpointError(
        f"{file} holds no SAM image encoder (vision_encoder.* or image_encoder.*); found {len(raw)} tensors, "
        f"such as {_names(names, 3) or 'none'}"
    )


def _read_config(directory: Path | None, converted: StateDict, weights: Path) -> SamConfig:
    """The directory's config.json, else the architecture the tensors show."""
    path = directory / "config.json" if directory is not None else None
    try:
        if path is None or not path.is_file():
            return config_from_tensors(converted)
        return SamConfig.from_hf_dict(_json_object(path))
    except ValueError as e:
        raise CheckpointError(f"{path if path is not None and path.is_file() else weights}: {e}") from None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    return raw


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
