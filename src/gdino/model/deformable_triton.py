"""Moved to ``gdino.model.ops.deformable_triton``; this path stays for code written against it."""

from gdino.model.ops.deformable_triton import *  # noqa: F403 (the moved module's names, under the old path)
