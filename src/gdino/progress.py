"""Moved to ``gdino.apps.progress``; this path stays for code written against it."""

from gdino.apps.progress import *  # noqa: F403 (the moved module's names, under the old path)
