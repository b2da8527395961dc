"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch.

    from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection

The names below are imported on first use (PEP 562), so that ``import gdino.runtime.onnx``, the
torch-free runtime, does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("gdino")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

# name -> (module, attribute); AutoProcessor and AutoModelForZeroShotObjectDetection are the names
# the model card's snippet uses.
_EXPORTS = {
    "AutoModelForZeroShotObjectDetection": (".inference.detector", "GroundingDinoForObjectDetection"),
    "AutoProcessor": (".processing.processor", "GroundingDinoProcessor"),
    "CheckpointError": (".utils.hub", "CheckpointError"),
    "Detections": (".inference.detections", "Detections"),
    "GroundingDinoConfig": (".models.grounding_dino.config", "GroundingDinoConfig"),
    "GroundingDinoForObjectDetection": (".inference.detector", "GroundingDinoForObjectDetection"),
    "GroundingDinoProcessor": (".processing.processor", "GroundingDinoProcessor"),
    "ImageError": (".processing.image", "ImageError"),
    "PromptError": (".processing.text", "PromptError"),
    "Sam2Model": (".inference.sam_models", "Sam2Model"),
    "Sam2Processor": (".processing.sam2_processor", "Sam2Processor"),
    "SamHQModel": (".inference.sam_models", "SamHQModel"),
    "SamModel": (".inference.sam_models", "SamModel"),
    "SamProcessor": (".processing.sam_processor", "SamProcessor"),
    "Segmenter": (".inference.segmenter", "Segmenter"),
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
