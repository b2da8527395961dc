"""Moved to ``gdino.checkpoint.convert``; this path stays for code written against it."""

from gdino.checkpoint.convert import *  # noqa: F403 (the moved module's names, under the old path)
