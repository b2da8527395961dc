"""Checks of the numeric settings every entry point takes: the Python API, the CLI and the server.

One rule, checked before any work: a threshold is a real number (not a bool, not a string) that
is finite and lies in [0, 1]. ``-1``, ``nan``, ``inf`` and ``2`` are refused with a
``ValueError`` naming the argument, rather than silently keeping every box or none.
"""

from __future__ import annotations

import math
import numbers


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float when it is a finite number in [0, 1].

    Args:
        value: what the caller gave (a Python or numpy number).
        name: the argument's name, for the message (e.g. "box_threshold").

    Raises:
        ValueError: not a number, a bool, NaN, infinite, or outside [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(  # one exception type for every bad setting, mapped to exit 2 or 422
            f"{name} must be a number between 0 and 1, got {value!r} ({type(value).__name__})"
        )
    number = float(value)
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return number
