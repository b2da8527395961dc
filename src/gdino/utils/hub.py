"""Model names to local files: hub ids (downloaded, or read from the cache), packaged models, local paths.

``resolve`` turns what a user names (``--model``, ``from_pretrained``) into a ``Checkpoint``: the
weights file, its layout and the folder of its config and tokenizer files. Nothing here reads the
weights; ``gdino.checkpoint.loading`` does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# The checkpoint loaded when none is named: the published weights on the Hugging Face Hub.
DEFAULT_MODEL_ID = "IDEA-Research/grounding-dino-tiny"

_HUB_FILES = ["config.json", "model.safetensors", "*.json", "vocab.txt"]
_ORIGINAL_SUFFIXES = (".pth", ".pt", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name"
PACKAGED_MODELS: dict[str, str] = {
    "gdino-shapes": "the shapes model, trained from scratch by scripts/train_shapes.sh (coloured shapes only)",
    "gdino-shapes-sam": "the shapes segmenter (SAM 2.1 layout), trained from scratch on the shapes' masks",
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
    if any(path.glob("*.onnx")):
        raise CheckpointError(
            f"{path} holds ONNX graphs but no gdino_onnx.json, which a gdino export writes beside them; "
            "export again with `gdino export onnx --out DIR`"
        )
    raise CheckpointError(f"{path} holds no model.safetensors, pytorch_model.bin or single original .pth checkpoint")


def _download(repo_id: str, options: HubOptions) -> Path:
    """The snapshot directory of ``repo_id``; from the cache when the hub cannot be reached.

    With ``force_download`` there is no falling back to the cache, and with ``local_files_only``
    there is nothing to fall back from.
    """
    from huggingface_hub import snapshot_download  # imported here: only the hub path needs it

    def fetch(local_files_only: bool, force_download: bool) -> Path:
        folder = snapshot_download(
            repo_id,
            allow_patterns=_HUB_FILES,
            revision=options.revision,
            token=options.token,
            cache_dir=options.cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
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
    where = (
        "is not in the local cache (local_files_only=True)"
        if options.local_files_only
        else f"could not be downloaded from the Hugging Face Hub ({type(failure).__name__})"
        + ("" if options.force_download else " and is not in the local cache")
    )
    raise CheckpointError(
        f"{repo_id!r}{at} {where}; pass a local directory (config.json, model.safetensors) or an original "
        f"groundingdino_swint_ogc.pth file instead, e.g. --model ./grounding-dino-tiny"
    ) from None
