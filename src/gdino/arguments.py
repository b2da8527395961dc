"""Moved to ``gdino.apps.arguments``; this path stays for code written against it."""

from gdino.apps.arguments import *  # noqa: F403 (the moved module's names, under the old path)
