"""gdino as a CVAT auto-annotation function (``pip install 'gdino[cvat]'``).

cvat-cli loads this module, calls :func:`create` with the ``-p NAME=TYPE:VALUE`` parameters and
runs the function on every frame of the task, locally, uploading what it returns::

    cvat-cli task auto-annotate 42 --function-module gdino.integrations.cvat \\
        -p classes=str:"cat,dog" -p model=str:IDEA-Research/grounding-dino-tiny --conf-threshold 0.3

The same module serves CVAT's agent-based functions (``cvat-cli function create-native`` and
``cvat-cli function run-agent`` take the same ``--function-module`` and ``-p`` options).

Parameters of :func:`create`: ``classes`` (comma-separated; each one becomes a CVAT label of that
name, prompted as a label list), ``model`` (a hub id, local folder or ``.pth``), ``masks`` (a
segmenter: hub id, folder, ``.pt`` or ``gdino-shapes-sam``; the labels are then of type ``mask``
and each box comes back as a mask, or as polygons with ``--conv-mask-to-poly``), ``threshold``
(used when CVAT passes no ``--conf-threshold``) and ``device``. A box is returned when its score
is above the confidence threshold, with its score as the shape's ``score``. Models are loaded once
per process, however many functions are created on them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import PIL.Image
from cvat_sdk import auto_annotation as cvataa
from cvat_sdk import models
from cvat_sdk.masks import encode_mask

from gdino.inference.detections import Detections
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.masks import Masks
from gdino.inference.segmenter import Segmenter
from gdino.processing.prompts import check_labels
from gdino.processing.text import PromptError
from gdino.utils.hub import DEFAULT_MODEL_ID


class SegmenterLike(Protocol):
    """What the function needs of a segmenter (``gdino.inference.segmenter.Segmenter``)."""

    def add_masks(self, image: Any, found: Detections) -> Detections: ...


class GdinoFunction:
    """A CVAT detection function: the detector on a fixed label list, masks when a segmenter is given.

    Args:
        detector: the loaded model.
        classes: the label names; label ``i`` of the spec has id ``i``.
        segmenter: gives every box a mask; the spec's labels are then of type ``mask``.
        threshold: the box threshold when CVAT passes no confidence threshold (the model's default
            when None).

    Raises:
        cvat_sdk.auto_annotation.BadFunctionError: no classes, or classes the model cannot prompt.
    """

    def __init__(
        self,
        detector: GroundingDinoForObjectDetection,
        classes: Sequence[str],
        segmenter: SegmenterLike | None = None,
        threshold: float | None = None,
    ) -> None:
        self._detector = detector
        self._classes = _checked_classes(classes)
        self._segmenter = segmenter
        self._threshold = threshold
        self._spec = cvataa.DetectionFunctionSpec(
            labels=[
                cvataa.label_spec(name, i, type="mask" if segmenter is not None else "rectangle")
                for i, name in enumerate(self._classes)
            ]
        )

    @property
    def spec(self) -> cvataa.DetectionFunctionSpec:
        """The labels, one per class, ids 0..N-1."""
        return self._spec

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        """The boxes scoring above CVAT's threshold: rectangles, or masks / polygons with a segmenter."""
        threshold = context.conf_threshold if context.conf_threshold is not None else self._threshold
        found = self._detector.detect(image, labels=list(self._classes), box_threshold=threshold)
        assert isinstance(found, Detections)  # one image gives one Detections
        if self._segmenter is None:
            return [_rectangle(found, i) for i in range(len(found))]
        found = self._segmenter.add_masks(image, found)
        if found.masks is None:  # a segmenter always sets them; this keeps mypy and a stand-in honest
            raise cvataa.BadFunctionError("the segmenter returned no masks")
        shapes: list[models.LabeledShapeRequest] = []
        for i in range(len(found)):
            shapes.extend(_mask_shapes(found, found.masks, i, polygons=context.conv_mask_to_poly))
        return shapes


def create(
    classes: str,
    model: str = DEFAULT_MODEL_ID,
    masks: str = "",
    threshold: float = -1.0,
    device: str = "",
) -> GdinoFunction:
    """The function cvat-cli builds from ``-p`` parameters (all but ``classes`` optional).

    Args:
        classes: comma-separated label names, e.g. "cat,dog" (the names of the task's labels).
        model: a hub id, local folder or ``.pth`` file.
        masks: a segmenter to load ("" for rectangles only).
        threshold: the box threshold when CVAT passes none (a negative value: the model's default).
        device: "cpu", "cuda", ... ("" for the default).

    Raises:
        cvat_sdk.auto_annotation.BadFunctionError: no classes, or classes the model cannot prompt.
    """
    names = [name.strip() for name in classes.split(",") if name.strip()]
    _checked_classes(names)  # before any model is loaded
    detector = load_detector(model, device)
    segmenter = load_segmenter(masks, device) if masks else None
    return GdinoFunction(detector, names, segmenter, threshold if threshold >= 0 else None)


@functools.lru_cache(maxsize=4)
def load_detector(model: str, device: str = "") -> GroundingDinoForObjectDetection:
    """The detector, loaded once per (model, device) in this process and kept in eval mode."""
    return GroundingDinoForObjectDetection.from_pretrained(model, device=device or None).eval()


@functools.lru_cache(maxsize=4)
def load_segmenter(model: str, device: str = "") -> Segmenter:
    """The segmenter, loaded once per (model, device) in this process."""
    return Segmenter.from_pretrained(model, device=device or None)


def _checked_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if not classes:
        raise cvataa.BadFunctionError('no classes given: pass -p classes=str:"cat,dog"')
    try:
        return check_labels(list(classes))
    except PromptError as error:
        raise cvataa.BadFunctionError(f"classes: {error}") from error


def _rectangle(found: Detections, i: int) -> models.LabeledShapeRequest:
    points = [float(v) for v in found.boxes[i]]
    return cvataa.rectangle(int(found.label_ids[i]), points, score=_score(found, i))


def _score(found: Detections, i: int) -> float:
    return min(1.0, max(0.0, float(found.scores[i])))


def _mask_shapes(found: Detections, masks: Masks, i: int, *, polygons: bool) -> list[models.LabeledShapeRequest]:
    """Detection ``i`` as one mask shape, or one polygon per connected part; none for an empty mask."""
    label, score = int(found.label_ids[i]), _score(found, i)
    crop = masks.crops[i]
    if not crop.any():
        return []
    if polygons:
        return [cvataa.polygon(label, polygon, score=score) for polygon in masks.polygons(i)]
    x0, y0 = (int(v) for v in masks.offsets[i])
    bounds = [x0, y0, x0 + crop.shape[1], y0 + crop.shape[0]]
    return [cvataa.mask(label, encode_mask(masks.mask(i), bounds), score=score)]
