"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch.

    from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection
"""

from .checkpoint.loading import CheckpointError
from .config import GroundingDinoConfig
from .detector import Detections, GroundingDinoForObjectDetection
from .processing.image import ImageError
from .processing.processor import GroundingDinoProcessor
from .processing.text import PromptError

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
