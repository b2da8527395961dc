"""Moved to ``gdino.apps.label``; this path stays for code written against it."""

from gdino.apps.label import *  # noqa: F403 (the moved module's names, under the old path)
