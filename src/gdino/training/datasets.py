"""Training data readers in one call: COCO json, ODVG jsonl or a YOLO folder -> a :class:`Dataset`.

The readers themselves are ``gdino.training.coco``, ``.odvg`` and ``.yolo``; the sample type
and the bad-record report are in ``gdino.training.samples``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gdino.training.coco import read_coco
from gdino.training.odvg import read_label_map, read_odvg
from gdino.training.samples import DataError, Dataset, Phrase, Problem, Sample, read_image
from gdino.training.yolo import read_yolo

__all__ = [
    "DataError",
    "Dataset",
    "Phrase",
    "Problem",
    "Sample",
    "read_coco",
    "read_dataset",
    "read_image",
    "read_label_map",
    "read_odvg",
    "read_yolo",
]


def read_dataset(
    path: str | Path,
    images: str | Path | None = None,
    label_map: str | Path | dict[Any, str] | None = None,
    check_images: bool = True,
) -> Dataset:
    """Reads training data by its form: a folder (YOLO), ``.jsonl`` (ODVG) or ``.json`` (COCO).

    Args:
        path: the annotation file or YOLO folder.
        images: the image folder of a COCO/ODVG file (the file's folder when ``None``).
        label_map: an ODVG label map.
        check_images: read each image's header to find unreadable images and wrong sizes up front.

    Raises:
        DataError: a source that cannot be read at all; bad records are in ``Dataset.problems``.
    """
    source = Path(path)
    if source.is_dir():
        return read_yolo(source)
    if not source.is_file():
        raise DataError(f"training data not found: {source}")
    if source.suffix.lower() == ".jsonl":
        return read_odvg(source, images, label_map, check_images)
    if source.suffix.lower() == ".json":
        return read_coco(source, images, check_images)
    raise DataError(f"{source}: give a COCO .json, an ODVG .jsonl or a YOLO folder")
