"""Moved to ``gdino.apps.commands``; this path stays for code written against it."""

from gdino.apps.commands import *  # noqa: F403 (the moved module's names, under the old path)
