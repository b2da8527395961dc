"""For long runs over files: a small progress bar on stderr, and reading ahead in threads.

The bar is redrawn in place on a terminal and written as a line now and then otherwise.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def read_ahead(fn: Callable[[T], R], items: Iterable[T], ahead: int = 4, threads: int = 2) -> Iterator[R]:
    """``map(fn, items)`` in order, with up to ``ahead`` calls running in threads before they are needed."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class Progress:
    """``label  12/30 images [00:05<00:07, 2.3 images/s]``.

    Args:
        total: how many items there are.
        desc: what is being done, at the start of the line.
        unit: what an item is called.
        stream: where to write; stderr when None.
        every: on a stream that is not a terminal, the least seconds between two lines.
    """

    def __init__(
        self, total: int, desc: str, unit: str = "images", stream: IO[str] | None = None, every: float = 10.0
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.postfix = ""  # shown after the rate, e.g. "loss 1.234"
        self._start = self._last = time.monotonic()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._every = 0.1 if self._tty else every
        self._draw(force=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        self._draw(force=self.done >= self.total)

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._every:
            return
        self._last = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        left = (self.total - self.done) / rate if rate else None
        width = len(str(self.total))
        line = (
            f"{self.desc} {self.done:>{width}}/{self.total} {self.unit} "
            f"[{_clock(elapsed)}<{_clock(left)}, {rate:.2f} {self.unit}/s]"
            + (f" {self.postfix}" if self.postfix else "")
        )
        if self._tty:
            bar = 20
            filled = bar * self.done // max(1, self.total)
            self.stream.write(f"\r{line} |{'#' * filled}{'.' * (bar - filled)}|")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ChunkProgress:
    """An ``on_chunk`` callback (``gdino.inference.detector``) that shows the passes of a long label list.

    A label list of ``min_chunks`` chunks or more gets a ``detect  12/517 passes`` line per image
    on ``stream`` (stderr when None); shorter lists run quietly.
    """

    def __init__(
        self, desc: str = "detect: label chunks", min_chunks: int = 2, stream: IO[str] | None = None, every: float = 2.0
    ) -> None:
        self.desc, self.min_chunks, self.stream, self.every = desc, min_chunks, stream, every
        self._bar: Progress | None = None

    def __call__(self, done: int, total: int) -> None:
        if total < self.min_chunks:
            return
        if done == 0 or self._bar is None:
            self._bar = Progress(total, self.desc, unit="passes", stream=self.stream, every=self.every)
        if done > self._bar.done:
            self._bar.update(done - self._bar.done)
        if done >= total:
            self._bar.close()
            self._bar = None
