"""Moved to ``gdino.detections``; this path stays for code written against it."""

from gdino.detections import *  # noqa: F403 (the moved module's names, under the old path)
