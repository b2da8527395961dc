"""Moved to ``gdino.apps.server.settings``; this path stays for code written against it."""

from gdino.apps.server.settings import *  # noqa: F403 (the moved module's names, under the old path)
