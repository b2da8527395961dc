"""Moved to ``gdino.loss.matcher``; this path stays for code written against it."""

from gdino.loss.matcher import *  # noqa: F403 (the moved module's names, under the old path)
