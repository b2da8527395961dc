"""Moved to ``gdino.apps.server.batching``; this path stays for code written against it."""

from gdino.apps.server.batching import *  # noqa: F403 (the moved module's names, under the old path)
