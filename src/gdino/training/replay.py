"""Replay by pseudo-labels: the base model labels the training images with the classes it knew.

    from gdino.training.replay import pseudo_label
    dataset = pseudo_label(dataset, base_model, ["red circle", "blue square"], threshold=0.3)

A user's data set is annotated with only their classes, and its images hold other things nobody
labelled. Fine-tuned on it as it is, the model learns two wrong lessons: the old classes never
appear in a caption (their phrases drift), and the old objects in the images are background
(unmatched queries over them are pushed to zero). Before training, the frozen base model detects
the old vocabulary on every training image; each box it finds above ``threshold`` joins the
image's targets under its label, and the vocabulary joins the label list, so training captions
hold old classes as positives where they are and as negatives where they are not, as the base
model's own training did. A pseudo box that overlaps one of the user's boxes (IoU at least
``overlap``) is left out: the user's label wins (the base model calls a new "pink circle" a
"red circle").

The labels are written to ``OUT/replay_labels.json`` with the vocabulary and threshold, so a
resumed run reads them back instead of running the base model again (whose weights are by then
the checkpoint's).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from gdino.checkpoint.saving import read_classes_file
from gdino.inference.detections import Detections
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.postprocess import box_iou
from gdino.processing.image import ImageError
from gdino.training.samples import Dataset, Sample, read_image
from gdino.training.settings import TrainError
from gdino.utils.files import write_atomic

logger = logging.getLogger(__name__)

REPLAY_FILE = "replay_labels.json"
NMS_IOU = 0.5  # the base model's duplicate boxes of one label are merged before they become targets


def pseudo_label(
    dataset: Dataset,
    base: GroundingDinoForObjectDetection | Callable[[], GroundingDinoForObjectDetection],
    classes: Sequence[str],
    threshold: float = 0.3,
    overlap: float = 0.5,
    cache: Path | None = None,
    log: IO[str] | None = None,
    base_name: str = "",
) -> Dataset:
    """``dataset`` with the base model's boxes of ``classes`` added to every image's targets.

    Args:
        dataset: detection data (a label list); grounding data is refused.
        base: the model before fine-tuning (or what makes it: not called when the cache holds the
            labels); run in eval mode, its weights untouched.
        classes: the vocabulary to replay (the base model's classes).
        threshold: a pseudo box is kept when its score is at least this.
        overlap: a pseudo box overlapping one of the sample's own boxes by this IoU is left out.
        cache: a ``replay_labels.json`` to read (when it holds this vocabulary, threshold and
            ``base_name``) or write; one of another vocabulary is replaced.
        log: where the progress line goes.
        base_name: the base model's identity, recorded in the cache.

    Returns:
        The data set with ``names`` = its names then the classes it lacked (new ids after its
        largest), and each sample's boxes followed by its pseudo boxes.
    """
    if any(s.is_grounding for s in dataset.samples):
        raise TrainError("replay needs detection data (a label list); this data set has grounding captions")
    if not classes:
        raise TrainError("replay needs the classes to replay (--keep-classes)")
    wider = with_classes(dataset, classes)
    names = list(wider.names)
    key = {"classes": list(classes), "threshold": threshold, "base": base_name}
    found = _read_cache(cache, key) if cache is not None else None
    if found is None:
        model = base if isinstance(base, GroundingDinoForObjectDetection) else base()
        found = _detect_all(dataset, model, classes, threshold, log)
        if cache is not None:
            _write_cache(cache, key, found)
    samples = tuple(_with_pseudo(s, found.get(str(s.image), []), classes, names, overlap) for s in dataset.samples)
    return replace(wider, samples=samples)


def with_classes(dataset: Dataset, classes: Sequence[str]) -> Dataset:
    """``dataset`` with the ``classes`` it lacks appended to its label list (ids after its largest),
    so that training captions name them too."""
    missing = [c for c in dict.fromkeys(classes) if c not in dataset.names]
    top = max(dataset.ids, default=0)
    ids = tuple(dataset.ids) + tuple(range(top + 1, top + 1 + len(missing)))
    return replace(dataset, names=tuple(dataset.names) + tuple(missing), ids=ids, _index={})


Found = dict[str, list[list[float]]]  # image path -> [[x0, y0, x1, y1, class index, score], ...]


def _detect_all(
    dataset: Dataset, base: GroundingDinoForObjectDetection, classes: Sequence[str], threshold: float, log: Any
) -> Found:
    from gdino.utils.progress import Progress

    was_training = base.training
    base.eval()
    found: Found = {}
    try:
        with Progress(len(dataset), "replay labels", stream=log) as progress:
            for sample in dataset.samples:
                found[str(sample.image)] = _detect_one(base, sample, classes, threshold)
                progress.update(1)
    finally:
        base.train(was_training)
    return found


def _detect_one(
    base: GroundingDinoForObjectDetection, sample: Sample, classes: Sequence[str], threshold: float
) -> list[list[float]]:
    try:
        image = read_image(sample)
    except ImageError as e:  # the loader reports and skips it again when training reaches it
        logger.warning("replay: %s", e)
        return []
    found = base.detect(image, labels=list(classes), box_threshold=threshold, nms_threshold=NMS_IOU)
    assert isinstance(found, Detections)  # one image in, one result out
    return [[*map(float, box), float(k), float(s)] for box, k, s in zip(found.boxes, found.label_ids, found.scores)]


def _with_pseudo(
    sample: Sample, found: list[list[float]], classes: Sequence[str], names: list[str], overlap: float
) -> Sample:
    if not found:
        return sample
    rows = np.asarray(found, dtype=np.float32).reshape(-1, 6)
    boxes = np.clip(rows[:, :4], 0, [sample.width, sample.height, sample.width, sample.height])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if len(sample.boxes):
        keep &= box_iou(boxes, sample.boxes).max(axis=1) < overlap
    labels = tuple(names.index(classes[int(k)]) for k in rows[keep, 4])
    return replace(
        sample,
        boxes=np.concatenate([sample.boxes, boxes[keep]]).astype(np.float32),
        labels=tuple(sample.labels) + labels,
    )


def read_classes(model: str | Path | GroundingDinoForObjectDetection) -> tuple[str, ...]:
    """The label list in a checkpoint's ``classes.txt`` (``gdino train`` writes one; the packaged
    ``gdino-shapes`` has its 21 seen pairs); empty for a model object, a file, an uncached hub id, or
    a checkpoint without one."""
    from gdino.utils.hub import CheckpointError, resolve

    if isinstance(model, GroundingDinoForObjectDetection) or str(model).startswith("config:"):
        return ()
    try:
        directory = resolve(model, local_files_only=True).directory
    except CheckpointError:
        return ()
    return read_classes_file(directory)


def _read_cache(path: Path, key: dict[str, Any]) -> Found | None:
    """The cached labels when ``path`` holds them for this vocabulary, threshold and base model."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if {k: saved.get(k) for k in key} != key:
        return None
    return {k: [list(map(float, r)) for r in v] for k, v in saved["images"].items()}


def _write_cache(path: Path, key: dict[str, Any], found: Found) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({**key, "images": found}) + "\n")
