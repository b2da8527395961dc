"""Writing trained models: the Hugging Face layout, the original ``.pth`` layout, and resume state.

``save_pretrained(model, directory)`` writes what ``gdino`` and transformers'
``GroundingDinoForObjectDetection.from_pretrained`` / ``GroundingDinoProcessor.from_pretrained``
load: ``config.json``, ``model.safetensors`` (transformers' names, ``gdino.checkpoint.convert.ours_to_hf``),
``preprocessor_config.json`` and the tokenizer (``vocab.txt``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``). Files are written to a temporary folder
and moved into place, so a run killed while saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdino.checkpoint.convert import ours_to_hf, ours_to_original
from gdino.models.grounding_dino.model import GroundingDino
from gdino.processing.processor import GroundingDinoProcessor
from gdino.processing.text import packaged_vocab_path

STATE_FILE = "trainer_state.pt"
ORIGINAL_FILE = "groundingdino.pth"
# A LoRA run's adapters, beside its merged weights (``gdino.training.lora``). Not PEFT's
# ``adapter_config.json``: transformers, with peft installed, would load that on top of the
# already merged weights.
ADAPTERS_FILE = "adapters.safetensors"
ADAPTER_CONFIG_FILE = "lora_config.json"
# Every file save_pretrained (with a resume state) and export_original write into a checkpoint folder.
CLASSES_FILE = "classes.txt"  # the label list a gdino training run trained on, one per line
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "tokenizer.json",
        STATE_FILE,
        ORIGINAL_FILE,
        ADAPTERS_FILE,
        ADAPTER_CONFIG_FILE,
        CLASSES_FILE,
        Path(ORIGINAL_FILE).with_suffix(".tmp").name,
    }
)
CHECKPOINT_NAME = re.compile(r"epoch-[0-9]+|last")  # the trainer's checkpoint folders in OUT


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under transformers' names, each its own contiguous CPU tensor."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ours_to_hf(model.state_dict()).items()}


def processor_files(processor: GroundingDinoProcessor, max_text_len: int) -> dict[str, Any]:
    """The processor's JSON files by name (tokenizer and image settings), transformers' layout."""
    s = processor.image_settings
    image = {
        "image_processor_type": "GroundingDinoImageProcessor",
        "do_resize": s.do_resize,
        "size": {"shortest_edge": s.shortest_edge, "longest_edge": s.longest_edge},
        "resample": int(s.resample),
        "do_rescale": s.do_rescale,
        "rescale_factor": s.rescale_factor,
        "do_normalize": s.do_normalize,
        "image_mean": list(s.image_mean),
        "image_std": list(s.image_std),
        "do_pad": True,
        "processor_class": "GroundingDinoProcessor",
    }
    tokenizer = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": max_text_len,
        "processor_class": "GroundingDinoProcessor",
    }
    special = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    return {"preprocessor_config.json": image, "tokenizer_config.json": tokenizer, "special_tokens_map.json": special}


def classes_file(names: Sequence[str]) -> bytes:
    """``classes.txt``'s content: one label a line."""
    return "".join(f"{name}\n" for name in names).encode()


def read_classes_file(directory: Path | None) -> tuple[str, ...]:
    """The label list in ``directory/classes.txt`` (blank lines skipped); empty without one."""
    path = directory / CLASSES_FILE if directory is not None else None
    if path is None or not path.is_file():
        return ()
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def save_pretrained(
    model: GroundingDino,
    directory: str | Path,
    processor: GroundingDinoProcessor | None = None,
    state: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Writes the model (and its processor) in the Hugging Face layout; replaces ``directory``.

    ``state``: the trainer's resume state, written with it (``trainer_state.pt``); ``files``: other
    files for the folder by name (a LoRA run's adapters), written with the rest."""
    from safetensors.torch import save_file

    directory = Path(directory)
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        processor = GroundingDinoProcessor.default()
    config = model.config
    tmp = _fresh(directory.with_name(directory.name + ".tmp"))
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for name, content in processor_files(processor, config.max_text_len).items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.copyfile(packaged_vocab_path(), tmp / "vocab.txt")
    processor.tokenizer._tok.save(str(tmp / "tokenizer.json"))
    for name, content in (files or {}).items():
        (tmp / name).write_bytes(content)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    return _replace(tmp, directory)


def export_original(model: GroundingDino, path: str | Path) -> Path:
    """Writes ``{"model": state_dict}`` under the original repository's names (as its ``.pth``)."""
    config = model.config
    state = {k: v.detach().cpu() for k, v in ours_to_original(model.state_dict(), config.decoder_layers).items()}
    path = Path(path)
    torch.save({"model": state}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def foreign_entries(directory: Path) -> list[str]:
    """The names in ``directory`` that neither ``save_pretrained`` nor ``export_original`` writes
    (a folder or a link counts as foreign whatever its name), sorted."""
    return sorted(
        e.name for e in directory.iterdir() if e.name not in CHECKPOINT_FILES or e.is_symlink() or not e.is_file()
    )


def load_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)


def latest(out: Path) -> Path | None:
    """The checkpoint under ``out`` furthest into training (``epoch-N/`` or ``last/``).

    By step, then by epoch: at the end of an epoch ``last/`` (saved by ``save_every`` before the
    epoch is counted done) and ``epoch-N/`` share the step, and ``epoch-N/`` is the later one.
    Leftovers of a save cut short (``epoch-N.tmp/``, ``last.old/``) are never chosen."""
    found = []
    for directory in out.iterdir() if out.is_dir() else ():
        if not CHECKPOINT_NAME.fullmatch(directory.name):
            continue
        if (directory / STATE_FILE).is_file() and (directory / "model.safetensors").is_file():
            position = load_state(directory)["position"]
            found.append((int(position["step"]), int(position["epoch"]), directory.name, directory))
    return max(found)[3] if found else None


def _fresh(directory: Path) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def _replace(tmp: Path, directory: Path) -> Path:
    """Moves ``tmp`` to ``directory``, the old one out of the way first."""
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory
