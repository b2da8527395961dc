"""gdino: zero-shot object detection with Grounding DINO in plain PyTorch."""

__version__ = "0.1.0"
