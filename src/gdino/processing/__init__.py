"""Everything between user input and tensors, and back: ``prompts`` (every prompt and label-list
rule), ``classes`` (label lists as prompts that fit the model), ``text`` (tokenizer, phrases),
``image`` (loading, resizing) and ``processor`` (the transformers-compatible processor).

``gdino.processing`` itself re-exports the processor's names: it was that module before the
processing layer became a package. They are imported on first use (PEP 562), so that the
torch-free modules here (``text``, ``classes``, ``image``, ``prompts``; the ONNX runtime uses
them) do not import torch through the package.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any


def __getattr__(name: str) -> Any:
    processor = import_module("gdino.processing.processor")
    if name == "__all__" or name in processor.__all__:
        return getattr(processor, name)
    raise AttributeError(f"module 'gdino.processing' has no attribute {name!r}")
