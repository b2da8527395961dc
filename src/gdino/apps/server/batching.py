"""Dynamic batching: requests that arrive within a few milliseconds share one pass of the worker.

One worker thread owns the model. Requests are put on a queue; the worker takes the first one,
waits up to ``max_wait`` seconds for more (at most ``max_batch``) and runs the group:

* the image side (Swin and the input projections, ``model.encode_image``) runs once per distinct
  image of the group: requests whose uploads have the same bytes share it;
* BERT runs once per distinct prompt: the model's prompt cache holds it, within the group and
  across groups;
* the rest (feature enhancer, query selection, decoder, heads) runs per request, one image at a
  time, exactly as ``detect`` does, so an answer never depends on the other requests of its
  group (see the README on batch independence);
* with a segmenter, the requests that ask for masks are segmented last: one ``segment`` call per
  distinct image of the group (the segmenter encodes it once), with the best ``max_masks``
  boxes of each of its requests.

The number of requests admitted (queued or running) is bounded: ``reserve`` raises ``QueueFull``
past ``max_queue``, so memory stays bounded however many clients call at once. A job whose client
went away is dropped before it runs (or stopped at its next label chunk), and ``shutdown`` answers
the queued jobs at once and stops a running label list at its next chunk.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from PIL import Image

from gdino.apps.server.segmenting import Masked, segment_image
from gdino.apps.server.tiling import TILE_BATCH
from gdino.inference.detections import Detections
from gdino.inference.detector import EncodedImages, GroundingDinoForObjectDetection, on_chunk
from gdino.inference.tiles import TileSettings
from gdino.processing.prompts import TextInput

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests are admitted than the queue holds; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is stopping: the request is refused, or its job was not (fully) run."""


class Abandoned(RuntimeError):
    """The job's client went away; what it asked for is not worth finishing."""


@dataclass
class Job:
    """One request for the worker.

    Attributes:
        image: the decoded RGB image.
        key: equal keys mean the same image (e.g. a digest of the upload), encoded once per group.
        prompt: a prompt or a list of labels, already validated.
        box_threshold: as in ``detect``.
        text_threshold: as in ``detect``.
        masks: segment the detections too: the future gets ``Masked`` instead of ``Detections``.
        future: set by the worker to the ``Detections`` (``Masked``) or to the exception.
        abandoned: set when the client went away: the worker stops the job at its next label chunk.
    """

    image: Image.Image
    key: Hashable
    prompt: TextInput
    box_threshold: float | None  # None: the model's default
    text_threshold: float | None
    masks: bool = False
    tiles: TileSettings | None = None  # detect on tiles of the image (not its shared encoding)
    future: Future = field(default_factory=Future)
    abandoned: threading.Event = field(default_factory=threading.Event)


@dataclass
class BatchStats:
    """Counters of the worker, for ``/healthz`` and tests."""

    groups: int = 0
    requests: int = 0
    images_encoded: int = 0
    largest_group: int = 0
    dropped: int = 0  # jobs not run, or stopped between chunks, because their client went away


def run_group(
    model: GroundingDinoForObjectDetection,
    jobs: list[Job],
    check: Callable[[Job], None] | None = None,
    segmenter: Any = None,
    max_masks: int = 100,
) -> int:
    """Runs a group of jobs, sharing the image side between jobs with the same key.

    Each job's future gets its ``Detections`` (``Masked`` for a masks job, segmented by
    ``segmenter``, at most ``max_masks`` masks a job) or its own exception; one bad job does not
    fail the others. ``check(job)``, called before each job, before each of its label chunks and
    before its masks, may raise to end that job (e.g. ``ShuttingDown``). Returns the number of
    images encoded by the detector.
    """
    encoded: dict[Hashable, EncodedImages | BaseException] = {}
    to_segment: dict[Hashable, list[tuple[Job, Detections]]] = {}
    for job in jobs:
        if check is not None:
            try:
                check(job)
            except Exception as exc:  # noqa: BLE001 (the request's own answer, e.g. its client went away)
                job.future.set_exception(exc)
                continue
        if job.key not in encoded and job.tiles is None:
            try:
                encoded[job.key] = model.encode_image(job.image)
            except Exception as exc:  # noqa: BLE001 (reported to this image's requests, not the worker's end)
                encoded[job.key] = exc
        features = encoded[job.key] if job.tiles is None else job.image
        try:
            if isinstance(features, BaseException):
                raise features
            between_chunks = on_chunk(partial(_check_job, check, job)) if check is not None else nullcontext()
            with between_chunks:
                found = model.detect(
                    features,
                    job.prompt,
                    box_threshold=job.box_threshold,
                    text_threshold=job.text_threshold,
                    **_tile_options(job),
                )
        except Exception as exc:  # noqa: BLE001 (reported to this request; the worker goes on)
            job.future.set_exception(exc)
        else:
            if job.masks and segmenter is not None and isinstance(found, Detections):  # one image: one Detections
                to_segment.setdefault((job.key, job.tiles), []).append((job, found))
            else:
                job.future.set_result(found)
    for found_here in to_segment.values():
        segment_image(segmenter, found_here, check, max_masks)
    return len(encoded)


def _tile_options(job: Job) -> dict[str, Any]:
    """``detect``'s tile arguments for a job ({} for one without tiles)."""
    return {} if job.tiles is None else {"tiles": job.tiles, "batch_size": TILE_BATCH}


def _check_job(check: Callable[[Job], None], job: Job, done: int, total: int) -> None:
    """An ``on_chunk`` callback: ``check(job)`` between the passes of a long label list."""
    check(job)


class Batcher:
    """A bounded queue in front of one worker thread that runs the model.

    Args:
        model: the loaded model; only the worker thread calls it.
        max_queue: most requests admitted (waiting or running) at once.
        max_batch: most requests run as one group.
        max_wait: seconds the worker waits for more requests after the first of a group.
        segmenter: segments the detections of jobs that ask for masks (in the worker thread too).
        max_masks: most masks a job gets (its best detections).
    """

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        max_queue: int = 32,
        max_batch: int = 8,
        max_wait: float = 0.005,
        segmenter: Any = None,
        max_masks: int = 100,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or max_wait < 0 or max_masks < 1:
            raise ValueError("max_queue, max_batch and max_masks must be at least 1 and max_wait at least 0")
        self.model = model
        self.segmenter = segmenter
        self.max_masks = max_masks
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._admitted = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seconds_per_request = 0.1  # running mean, for Retry-After
        self._stopping = threading.Event()
        self.poll_seconds = 0.25  # how often a waiting request looks whether its client went away

    @property
    def pending(self) -> int:
        """Requests admitted and not finished."""
        return self._admitted

    def retry_after(self) -> int:
        """Seconds a client refused with ``QueueFull`` should wait: about the time to drain the queue."""
        return max(1, round(self._admitted * self._seconds_per_request))

    @contextmanager
    def reserve(self) -> Iterator[None]:
        """Admits one request for the duration of the block.

        Raises:
            QueueFull: ``max_queue`` requests are already admitted.
            ShuttingDown: ``shutdown`` was called.
        """
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down; retry on another instance or later")
        with self._lock:
            if self._admitted >= self.max_queue:
                raise QueueFull(f"the server is busy ({self._admitted} requests queued); retry later")
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    async def run(self, job: Job, gone: Callable[[], Awaitable[bool]] | None = None) -> Detections | Masked:
        """Queues ``job`` (admitted with ``reserve``) and waits for its detections.

        ``gone()`` is asked every ``poll_seconds`` whether the client went away; if so, the job is
        dropped (or stopped at its next label chunk) and ``Abandoned`` raised.
        """
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down; retry on another instance or later")
        self.start()
        self._queue.put(job)
        waiter = asyncio.wrap_future(job.future)
        if gone is None:
            return await waiter
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=self.poll_seconds)
            if done:
                return waiter.result()
            if await gone():
                job.abandoned.set()
                if job.future.cancel():  # still queued: the worker skips it
                    self._count_dropped()
                waiter.cancel()
                raise Abandoned("the client went away")

    def _count_dropped(self) -> None:
        with self._lock:
            self.stats.dropped += 1

    def _check(self, job: Job) -> None:
        """Ends ``job`` between label chunks when the server stops or its client went away."""
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down; the request was not finished")
        if job.abandoned.is_set():
            self._count_dropped()
            raise Abandoned("the client went away")

    def shutdown(self) -> None:
        """Refuses new requests, answers the queued ones with ``ShuttingDown`` at once, and makes a
        running label list stop at its next chunk; the worker thread then ends."""
        self._stopping.set()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server is shutting down; the request was not run"))
        self._queue.put(None)

    def start(self) -> None:
        """Starts the worker thread if it is not running."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="gdino-batcher", daemon=True)
                self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Lets the worker finish the queued requests, then ends it."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
        self._thread = None

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, stop = self._collect(first)
            self._run([job for job in group if job.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        """The first job and those arriving within ``max_wait``; True when told to stop."""
        group = [first]
        deadline = time.monotonic() + self.max_wait
        while len(group) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return group, True
            group.append(job)
        return group, False

    def _run(self, group: list[Job]) -> None:
        if not group:
            return
        s = self.stats  # counted before the answers go out, so a client that got its answer sees itself counted
        s.groups += 1
        s.requests += len(group)
        s.images_encoded += len({job.key for job in group})
        s.largest_group = max(s.largest_group, len(group))
        start = time.perf_counter()
        try:
            run_group(self.model, group, self._check, self.segmenter, self.max_masks)
        except BaseException as exc:  # a bug in run_group itself: fail the group, keep the worker
            log.exception("batch worker failed")
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * elapsed / len(group)
