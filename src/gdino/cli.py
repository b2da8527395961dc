"""Moved to ``gdino.apps.cli``; this path stays for code written against it."""

from gdino.apps.cli import *  # noqa: F403 (the moved module's names, under the old path)
from gdino.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
