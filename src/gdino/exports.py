"""Moved to ``gdino.apps.exports``; this path stays for code written against it."""

from gdino.apps.exports import *  # noqa: F403 (the moved module's names, under the old path)
