"""Moved to ``gdino.loss.criterion``; this path stays for code written against it."""

from gdino.loss.criterion import *  # noqa: F403 (the moved module's names, under the old path)
