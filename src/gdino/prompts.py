"""Moved to ``gdino.processing.prompts``; this path stays for code written against it."""

from gdino.processing.prompts import *  # noqa: F403 (the moved module's names, under the old path)
