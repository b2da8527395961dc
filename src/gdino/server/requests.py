"""Moved to ``gdino.apps.server.requests``; this path stays for code written against it."""

from gdino.apps.server.requests import *  # noqa: F403 (the moved module's names, under the old path)
