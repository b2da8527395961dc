"""Moved to ``gdino.processing.classes``; this path stays for code written against it."""

from gdino.processing.classes import *  # noqa: F403 (the moved module's names, under the old path)
