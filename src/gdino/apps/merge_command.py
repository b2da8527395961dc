"""``gdino merge BASE TUNED --alpha A --out DIR``: WiSE-FT, a thin layer over ``gdino.checkpoint.merge``.

Writes ``(1 - A) * BASE + A * TUNED`` per tensor as a plain checkpoint in DIR. Bad input (an
alpha that is not a number from 0 to 1, checkpoints of other architectures or vocabularies or
with other tensors, a DIR that is not new or empty or is an input) is a one-line error, status 2,
before anything is written. Imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gdino.apps.arguments import EXIT_BAD_INPUT, fraction


def add_arguments(commands: Any) -> None:
    """Adds ``merge`` to ``gdino``'s subparsers."""
    merge = commands.add_parser(
        "merge", help="interpolate a base model and its fine-tune by weights (WiSE-FT) into a new checkpoint"
    )
    merge.add_argument("base", metavar="BASE", help="the model fine-tuned from: hub id, directory, file, gdino-shapes")
    merge.add_argument("tuned", metavar="TUNED", help="the fine-tuned checkpoint (e.g. runs/mine/epoch-6)")
    merge.add_argument(
        "--alpha", type=fraction, required=True, help="0 to 1: 0 gives BASE, 1 TUNED; (1 - A) * BASE + A * TUNED"
    )
    merge.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the merged checkpoint")


def main(args: argparse.Namespace) -> int:
    """Runs ``merge``; a refused input or output is one line on stderr, status 2."""
    from gdino.checkpoint.merge import MergeError, merge_checkpoints
    from gdino.utils.hub import CheckpointError

    try:
        out = merge_checkpoints(args.base, args.tuned, args.alpha, args.out)
    except (MergeError, CheckpointError) as e:
        print(f"gdino: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"merge: {args.alpha:g} of {args.tuned} and {1 - args.alpha:g} of {args.base} in {out}", file=sys.stderr)
    return 0
