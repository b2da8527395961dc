"""Moved to ``gdino.apps.evaluate``; this path stays for code written against it."""

from gdino.apps.evaluate import *  # noqa: F403 (the moved module's names, under the old path)
