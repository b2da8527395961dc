"""Moved to ``gdino.processing.text``; this path stays for code written against it."""

from gdino.processing.text import *  # noqa: F403 (the moved module's names, under the old path)
