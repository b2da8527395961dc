"""Copies a trained shapes checkpoint into the package as ``gdino-shapes`` (src/gdino/data/gdino-shapes).

    python scripts/package_shapes.py out-shapes/run/epoch-4

The weights are stored in float16 (half the size; they load into the float32 model) and the
files the processor and transformers need are kept: config, preprocessor and tokenizer settings
and the vocabulary. The optimiser state and tokenizer.json (the vocabulary again) are left out.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "src" / "gdino" / "data" / "gdino-shapes"
KEEP = ("config.json", "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt")


def package(checkpoint: Path, target: Path = TARGET) -> Path:
    """Writes ``target`` from ``checkpoint`` (a directory ``gdino train`` wrote); returns ``target``."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    target.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copyfile(checkpoint / name, target / name)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(half, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(package(Path(sys.argv[1])))
