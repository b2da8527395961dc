"""gdino as a FiftyOne ``Model``: ``dataset.apply_model(GdinoModel(...), label_field="gdino")``.

For datasets in FiftyOne (``pip install 'gdino[fiftyone]'``)::

    import fiftyone as fo
    from gdino.integrations.fiftyone import GdinoModel

    model = GdinoModel("gdino-shapes", labels=["red circle", "blue star"])   # or prompt="a cat. a dog."
    dataset.apply_model(model, label_field="gdino", confidence_thresh=0.3, batch_size=4)

Each image's detections become ``fo.Detections``: ``label`` (the label or phrase), ``confidence``
(the score) and ``bounding_box`` ``[x, y, w, h]`` relative to the image, exactly ``detect``'s boxes
divided by the image's size. With ``segmenter=`` each detection also gets its instance ``mask``:
the segmenter's mask cropped to the box's pixels (FiftyOne's layout: a bool array spanning the box).
A batch of ``batch_size`` images (of any sizes) is one ``detect`` call with ``batch_size``, so the
images go through the model together; every image gives the detections it gives alone.
``apply_model(..., confidence_thresh=t)`` hands ``t`` to the model (``model.config.confidence_thresh``,
FiftyOne's protocol for models that threshold themselves): boxes scoring above ``t`` are kept; without
it, boxes above ``box_threshold``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import fiftyone as fo
import numpy as np
import PIL.Image
from fiftyone.core.models import Model

from gdino.inference.detections import Detections
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.masks import Masks
from gdino.inference.segmenter import Segmenter
from gdino.processing.prompts import check_labels


class SegmenterLike(Protocol):
    """What the model needs of a segmenter (``gdino.inference.segmenter.Segmenter``)."""

    def add_masks(self, image: Any, found: Detections) -> Detections: ...


class GdinoModelConfig:
    """What FiftyOne's ``apply_model`` sets on the model while it runs: ``confidence_thresh``."""

    def __init__(self, confidence_thresh: float | None = None) -> None:
        self.confidence_thresh = confidence_thresh


class GdinoModel(Model):  # fiftyone is untyped: Model is Any to mypy
    """A FiftyOne image model that runs a gdino detector on a label list or a phrase prompt.

    Args:
        model: a hub id, local directory or ``.pth`` (``from_pretrained``), or an already loaded
            ``GroundingDinoForObjectDetection``.
        labels: the label list, or
        prompt: a phrase prompt ("a red circle. a blue star.").
        box_threshold: keep a box whose score is above this (FiftyOne's ``confidence_thresh`` then
            filters the kept ones).
        text_threshold: phrase prompts only, as in ``detect``.
        segmenter: a ``Segmenter`` (or the name ``Segmenter.from_pretrained`` loads) for instance masks.
        device: where a model loaded here runs ("cpu", "cuda", ...).

    Raises:
        ValueError: neither or both of ``labels`` and ``prompt``.
        gdino.PromptError: labels the model cannot prompt (none, duplicates).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | GroundingDinoForObjectDetection,
        labels: Sequence[str] | None = None,
        prompt: str | None = None,
        *,
        box_threshold: float = 0.3,
        text_threshold: float | None = None,
        segmenter: SegmenterLike | str | None = None,
        device: str | None = None,
    ) -> None:
        if (labels is None) == (prompt is None):
            raise ValueError("give exactly one of labels=[...] and prompt='...'")
        self._labels = check_labels(list(labels)) if labels is not None else None
        self._prompt = prompt
        self._box_threshold = box_threshold
        self._text_threshold = text_threshold
        self._detector = (
            model
            if isinstance(model, GroundingDinoForObjectDetection)
            else GroundingDinoForObjectDetection.from_pretrained(model, device=device).eval()
        )
        if isinstance(segmenter, str):
            segmenter = Segmenter.from_pretrained(segmenter, device=device)
        self._segmenter = segmenter
        self._preprocess = True
        self.config = GdinoModelConfig()

    @property
    def media_type(self) -> str:
        """FiftyOne runs it on images."""
        return "image"

    @property
    def ragged_batches(self) -> bool:
        """False: there are no transforms, so FiftyOne batches (it ignores ``batch_size`` for a ragged
        model) and passes each batch as a list of arrays, which may differ in size."""
        return False

    @property
    def transforms(self) -> None:
        """No transforms: FiftyOne passes each image as an (H, W, 3) uint8 RGB array."""
        return None

    @property
    def preprocess(self) -> bool:
        """Whether FiftyOne applies ``transforms`` (none here) before calling the model."""
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value: bool) -> None:
        self._preprocess = value

    @property
    def has_logits(self) -> bool:
        return False

    @property
    def has_embeddings(self) -> bool:
        return False

    def predict(self, arg: Any) -> fo.Detections:
        """One image (an (H, W, 3) uint8 array, a PIL image or a path) -> its ``fo.Detections``."""
        return self.predict_all([arg])[0]

    def predict_all(self, args: Sequence[Any]) -> list[fo.Detections]:
        """A batch of images -> their ``fo.Detections``, through ``detect`` in one batch."""
        images = [_image(a) for a in args]  # a list, or an (N, H, W, 3) array
        if not images:
            return []
        found = self._detector.detect(
            images,
            self._prompt,
            labels=list(self._labels) if self._labels is not None else None,
            box_threshold=self._threshold(),
            text_threshold=self._text_threshold,
            batch_size=len(images),
        )
        assert isinstance(found, list)  # a list of images gives a list
        if self._segmenter is not None:
            found = [self._segmenter.add_masks(image, f) for image, f in zip(images, found)]
        return [to_fiftyone(f) for f in found]

    def _threshold(self) -> float:
        chosen = self.config.confidence_thresh
        return float(chosen) if chosen is not None else self._box_threshold


def to_fiftyone(found: Detections) -> fo.Detections:
    """``Detections`` -> ``fo.Detections``: relative ``[x, y, w, h]`` boxes, labels, confidences, masks."""
    width, height = found.image_size
    detections = []
    for i in range(len(found)):
        x0, y0, x1, y1 = (float(v) for v in found.boxes[i])
        detection = fo.Detection(
            label=found.labels[i],
            bounding_box=[x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height],
            confidence=float(found.scores[i]),
        )
        if found.masks is not None:
            detection.mask = box_mask(found.masks, i, found.boxes[i])
        detections.append(detection)
    return fo.Detections(detections=detections)


def box_mask(masks: Masks, i: int, box: np.ndarray) -> np.ndarray:
    """Mask ``i`` over the pixels its box covers (floor of the box's start, ceil of its end, in the
    image): FiftyOne's instance mask, which it stretches over the box when drawing it."""
    width, height = masks.image_size
    x0, y0 = max(0, math.floor(float(box[0]))), max(0, math.floor(float(box[1])))
    x1, y1 = min(width, max(x0 + 1, math.ceil(float(box[2])))), min(height, max(y0 + 1, math.ceil(float(box[3]))))
    return masks.mask(i)[y0:y1, x0:x1].copy()


def _image(arg: Any) -> Any:
    """An array FiftyOne passes ((H, W, 3) uint8 RGB; grey or RGBA too) -> a PIL image; others as given."""
    if isinstance(arg, np.ndarray):
        if arg.ndim == 2:
            arg = np.repeat(arg[:, :, None], 3, axis=2)
        return PIL.Image.fromarray(np.ascontiguousarray(arg[:, :, :3], dtype=np.uint8))
    return arg
