"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch.

    from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection

The names below are imported on first use (PEP 562), so that ``import gdino.onnx``, the
torch-free runtime, does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> (module, attribute); AutoProcessor and AutoModelForZeroShotObjectDetection are the names
# the model card's snippet uses.
_EXPORTS = {
    "AutoModelForZeroShotObjectDetection": (".detector", "GroundingDinoForObjectDetection"),
    "AutoProcessor": (".processing", "GroundingDinoProcessor"),
    "CheckpointError": (".weights", "CheckpointError"),
    "Detections": (".detections", "Detections"),
    "GroundingDinoConfig": (".config", "GroundingDinoConfig"),
    "GroundingDinoForObjectDetection": (".detector", "GroundingDinoForObjectDetection"),
    "GroundingDinoProcessor": (".processing", "GroundingDinoProcessor"),
    "ImageError": (".image", "ImageError"),
    "PromptError": (".text", "PromptError"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gdino' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(import_module(module, __name__), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
