"""Checkpoints: hub and local resolution, key conversion, strict loading."""
