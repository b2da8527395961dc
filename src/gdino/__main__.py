"""``python -m gdino``: the command line (``gdino.apps.cli``)."""

from gdino.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
