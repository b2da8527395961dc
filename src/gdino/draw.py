"""Moved to ``gdino.apps.draw``; this path stays for code written against it."""

from gdino.apps.draw import *  # noqa: F403 (the moved module's names, under the old path)
