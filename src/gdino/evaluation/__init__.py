"""Evaluation protocols: ``coco`` (COCO box AP as the original repository's script computes it)."""
