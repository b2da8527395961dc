"""Moved to ``gdino.apps.server.schema``; this path stays for code written against it."""

from gdino.apps.server.schema import *  # noqa: F403 (the moved module's names, under the old path)
