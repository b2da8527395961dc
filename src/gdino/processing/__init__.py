"""Moved to ``gdino.processing.processor``; this path stays for code written against it."""

from gdino.processing.processor import *  # noqa: F403 (the moved module's names, under the old path)
