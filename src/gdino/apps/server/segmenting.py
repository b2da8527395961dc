"""The masks of ``masks=true`` requests: the best ``max_masks`` detections of each, one
``segment`` call per image (run by the batching worker, after the detector).

The segmenter's work per request is bounded by ``max_masks`` box decodings (and one image
encoding), however many boxes the detector found: the detector has run by the time the count is
known, and the page asks for every box, so the others are answered without masks rather than
the request refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.tiled_masks import segment_regions
from gdino.inference.tiles import TileSettings


class MaskJob(Protocol):
    """What segmenting needs of a batching job: its image, its tiles (None: whole), and the future its
    answer goes to."""

    image: Image.Image
    tiles: TileSettings | None
    future: Future


J = TypeVar("J", bound=MaskJob)


@dataclass(frozen=True)
class Masked:
    """A masks job's answer: its detections, best first, split where the masks stop.

    Attributes:
        masked: the best ``max_masks`` (at most) detections, each with its mask and mask score.
        unmasked: the others, without masks.
    """

    masked: Detections
    unmasked: Detections

    @property
    def image_size(self) -> tuple[int, int]:
        return self.masked.image_size

    def to_list(self) -> list[dict[str, Any]]:
        """The detections as ``Detections.to_list`` writes them, the masked first (they are the best)."""
        return self.masked.to_list() + self.unmasked.to_list()


def detections_slice(found: Detections, start: int, stop: int | None = None) -> Detections:
    """Detections ``start:stop`` of ``found`` (without masks)."""
    part = slice(start, stop)
    return replace(
        found,
        boxes=found.boxes[part],
        scores=found.scores[part],
        labels=found.labels[part],
        label_ids=found.label_ids[part],
        masks=None,
        mask_scores=None,
    )


def segment_image(
    segmenter: Any, jobs: Sequence[tuple[J, Detections]], check: Callable[[J], None] | None, max_masks: int
) -> None:
    """Sets each job's future to ``Masked``: masks for its best ``max_masks`` detections, all the
    jobs of one image and tiling (``jobs``: each with the ``Detections`` found) in one ``segment`` call
    (with tiles, one per tile crop that holds boxes: ``gdino.inference.tiled_masks``); or to
    the exception ``check(job)`` raises, or that segmenting raised."""
    live = []
    for job, found in jobs:
        try:
            if check is not None:
                check(job)
        except Exception as exc:  # noqa: BLE001 (the request's own answer, e.g. its client went away)
            job.future.set_exception(exc)
        else:
            live.append((job, detections_slice(found, 0, max_masks), detections_slice(found, max_masks)))
    if not live:
        return
    try:
        boxes = np.concatenate([head.boxes.reshape(-1, 4) for _, head, _ in live])  # (sum of N_i, 4)
        masks, scores = segment_regions(segmenter, live[0][0].image, boxes, live[0][0].tiles)
    except Exception as exc:  # noqa: BLE001 (reported to this image's requests; the worker goes on)
        for job, _, _ in live:
            job.future.set_exception(exc)
        return
    start = 0
    for job, head, tail in live:
        index = np.arange(start, start + len(head))
        start += len(head)
        job.future.set_result(Masked(head.with_masks(masks.select(index), scores[index]), tail))
