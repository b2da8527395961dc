"""Moved to ``gdino.processing.image``; this path stays for code written against it."""

from gdino.processing.image import *  # noqa: F403 (the moved module's names, under the old path)
