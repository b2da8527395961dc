"""Label Studio's brush RLE decoded as rle-pack publishes it, to check what gdino writes (tests only)."""

from __future__ import annotations

import numpy as np


def decode_brush_rle(data: list[int]) -> np.ndarray:
    """rle-pack's decode: a 32-bit count, the word size - 1 (5 bits), four run-length widths - 1 (4 bits
    each), then runs: a repeat bit, a 2-bit width index, the run length - 1, and one word (repeat) or
    that many words (literal)."""
    bits = "".join(f"{b:08b}" for b in data)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        pos += n
        return int(bits[pos - n : pos], 2)

    count, word = read(32), read(5) + 1
    widths = [read(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < count:
        repeat = read(1)
        n = read(widths[read(2)]) + 1
        out.extend([read(word)] * n if repeat else [read(word) for _ in range(n)])
    return np.asarray(out, np.uint8)
