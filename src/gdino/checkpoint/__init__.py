"""Checkpoints: hub and local resolution, strict loading (``loading``) and the pure key conversion
between the Hugging Face layout, ours and the original repository's (``convert``)."""
