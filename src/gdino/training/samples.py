"""What every training data reader produces: samples, their label list, and a report of bad records.

A :class:`Sample` is one image and its boxes, ``xyxy`` in **pixels of the image as the annotations
see it** (see :func:`read_image`), each box with a label:

* detection data (COCO, ODVG ``detection``, YOLO): ``labels[i]`` indexes the data set's label
  list (:attr:`Dataset.names`), and ``caption`` is ``None``; a training caption is built per
  sample from the positive labels and sampled negatives (``gdino.training.captions``);
* grounding data (ODVG ``grounding``): the sample keeps its ``caption``, ``phrases`` are the
  distinct region phrases with their character spans in it, and ``labels[i]`` indexes ``phrases``.

Readers never stop at a bad record and never drop one silently: each is a :class:`Problem`
(file, record, reason) in ``Dataset.problems``, and the image it belongs to is left out (an
image with one bad box would otherwise teach the model that its object is background).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gdino.processing.image import ImageError, read_annotated_image

logger = logging.getLogger(__name__)

# How far (pixels) a box may overshoot the image before it counts as outside it; overshoot up to
# this is clipped (COCO files often have x + w = width + 0.01 from rounding).
BOX_TOLERANCE = 1.0


class DataError(ValueError):
    """An annotation source that cannot be used at all (unreadable, not the format it claims)."""


@dataclass(frozen=True)
class Problem:
    """A record that was skipped: where it is and why."""

    file: str
    where: str  # "line 12", "annotations[5] (id 17)", ...
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.reason}"


@dataclass(frozen=True)
class Phrase:
    """A grounding phrase: its text and the character spans it covers in the caption."""

    text: str
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Sample:
    """One training image.

    Attributes:
        image: path of the image file.
        width, height: its size as the annotations see it (pixels).
        boxes: (N, 4) float32 ``x0, y0, x1, y1`` in pixels, inside the image, non-empty.
        labels: (N,) per box: index into the data set's ``names`` (detection) or ``phrases`` (grounding).
        caption: the grounding caption, or ``None`` for detection data.
        phrases: grounding phrases (``labels`` index them); empty for detection data.
        origin: where the record is, for messages ("train.jsonl: line 4").
    """

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: tuple[int, ...]
    caption: str | None = None
    phrases: tuple[Phrase, ...] = ()
    origin: str = ""

    @property
    def is_grounding(self) -> bool:
        return self.caption is not None


@dataclass(frozen=True)
class Dataset:
    """Samples read from one annotation source, with the label list and the skipped records.

    Attributes:
        samples: the good images, in file order.
        names: the label list of detection data (COCO category names sorted by id, the ODVG
            label map by label, YOLO ``classes.txt``); empty for grounding-only data.
        ids: the source's id of each label (``ids[i]`` is the COCO ``category_id`` or ODVG
            ``label`` of ``names[i]``), so predictions map back exactly.
        problems: one per skipped record.
        source: the annotation file or folder.
    """

    samples: tuple[Sample, ...]
    names: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    problems: tuple[Problem, ...] = ()
    source: str = ""
    _index: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def label_of_id(self, source_id: int) -> int:
        """The index in ``names`` of a source id (e.g. a COCO category id)."""
        if not self._index:
            self._index.update({source_id: i for i, source_id in enumerate(self.ids)})
        return self._index[source_id]

    def report(self, limit: int = 20) -> str:
        """A summary a trainer can print: counts, then the first ``limit`` problems."""
        head = f"{self.source}: {len(self.samples)} images"
        if not self.problems:
            return head + ", no bad records"
        lines = [f"{head}; {len(self.problems)} bad records skipped:"]
        lines += [f"  {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------- boxes and images


def check_box(box: Sequence[float], width: float, height: float) -> tuple[float, float, float, float]:
    """An ``xyxy`` pixel box clipped to the image, or ValueError saying what is wrong with it."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box {box!r} is not 4 numbers") from None
    if not all(np.isfinite((x0, y0, x1, y1))):
        raise ValueError(f"box {box!r} has a non-finite coordinate")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box x0,y0,x1,y1 = {x0:g},{y0:g},{x1:g},{y1:g} is empty")
    t = BOX_TOLERANCE
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
        raise ValueError(f"box x0,y0,x1,y1 = {x0:g},{y0:g},{x1:g},{y1:g} is outside the {width}x{height} image")
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} has no area inside the {width}x{height} image")
    return x0, y0, x1, y1


def as_boxes(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """A list of xyxy boxes -> (N, 4) float32."""
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def image_size(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(stored (w, h), EXIF-oriented (w, h))`` from the header alone (cheap).

    Raises:
        ImageError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as img:
            size = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 (not an image, corrupt header ...)
        raise ImageError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    oriented = size[::-1] if orientation in _SWAPPING_ORIENTATIONS else size
    return size, oriented


def check_image(path: Path, width: int | None, height: int | None) -> tuple[int, int]:
    """The image's ``(width, height)`` as the annotations see it; ImageError if it is unreadable or
    fits the annotations' size neither as stored nor EXIF-rotated."""
    stored, oriented = image_size(path)
    if width is None or height is None:
        return oriented
    if (width, height) in (stored, oriented):
        return int(width), int(height)
    raise ImageError(f"{path} is {stored[0]}x{stored[1]} but the annotations say {width}x{height}")


def read_image(sample: Sample) -> np.ndarray:
    """The sample's image, ``(H, W, 3)`` uint8, as its boxes see it (``read_annotated_image``: as stored,
    or EXIF-rotated when only that fits its size, the rule ``gdino eval coco`` reads images by).

    Raises:
        ImageError: the file cannot be decoded or its size fits neither way.
    """
    return read_annotated_image(sample.image, (sample.width, sample.height))
