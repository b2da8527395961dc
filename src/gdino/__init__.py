"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch.

    from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection
"""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint.loading import CheckpointError
from .config import GroundingDinoConfig
from .detections import Detections
from .detector import GroundingDinoForObjectDetection
from .processing.image import ImageError
from .processing.processor import GroundingDinoProcessor
from .processing.text import PromptError

# The names the model card's snippet uses.
AutoProcessor = GroundingDinoProcessor
AutoModelForZeroShotObjectDetection = GroundingDinoForObjectDetection

try:
    __version__ = version("gdino")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AutoModelForZeroShotObjectDetection",
    "AutoProcessor",
    "CheckpointError",
    "Detections",
    "GroundingDinoConfig",
    "GroundingDinoForObjectDetection",
    "GroundingDinoProcessor",
    "ImageError",
    "PromptError",
]
