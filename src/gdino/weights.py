"""Moved to ``gdino.checkpoint.loading``; this path stays for code written against it."""

from gdino.checkpoint.loading import *  # noqa: F403 (the moved module's names, under the old path)
