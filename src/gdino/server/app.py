"""Moved to ``gdino.apps.server.app``; this path stays for code written against it."""

from gdino.apps.server.app import *  # noqa: F403 (the moved module's names, under the old path)
