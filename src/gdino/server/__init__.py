"""Moved to ``gdino.apps.server``; this path stays for code written against it."""

from gdino.apps.server import *  # noqa: F403 (the moved module's names, under the old path)
