"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch.

    from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection
"""

from .config import GroundingDinoConfig
from .detector import Detections, GroundingDinoForObjectDetection
from .image import ImageError
from .processing import GroundingDinoProcessor
from .text import PromptError
from .weights import CheckpointError

# The names the model card's snippet uses.
AutoProcessor = GroundingDinoProcessor
AutoModelForZeroShotObjectDetection = GroundingDinoForObjectDetection

__version__ = "0.1.0"

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
