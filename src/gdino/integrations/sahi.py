"""gdino as a SAHI ``DetectionModel``: ``get_sliced_prediction(image, GdinoDetectionModel(...), ...)``.

For pipelines already built on SAHI (``pip install 'gdino[sahi]'``)::

    from sahi.predict import get_sliced_prediction
    from gdino.integrations.sahi import GdinoDetectionModel

    model = GdinoDetectionModel("gdino-shapes", labels=["red circle", "blue star"], confidence_threshold=0.25)
    result = get_sliced_prediction("canvas.png", model, slice_height=192, slice_width=192)

SAHI then slices, runs this class once per slice (or per batch of ``batch_size`` slices, which go
through the whole model together) and merges. gdino's own tiling (``model.detect(image, labels,
tiles=TileSettings(...))``) gives the same merged boxes from the same per-tile detections at about
the same cost (the same batched passes; ``bench/tiles.py``), and with ``segmenter=`` it also gives
masks, each box segmented on its tile.

The detections of one slice are ``detect``'s: a box is kept when its score is above
``confidence_threshold`` (``detect``'s ``box_threshold``). Note that SAHI switches its merge to NMS
when ``confidence_threshold`` is under 0.1 unless ``force_postprocess_type=True`` is given.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
from sahi.models.base import DetectionModel
from sahi.prediction import ObjectPrediction

from gdino.inference.detections import Detections
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.utils.hub import DEFAULT_MODEL_ID


class GdinoDetectionModel(DetectionModel):
    """A SAHI detection model that runs a gdino checkpoint on a prompt or a label list.

    Args:
        model_path: a hub id, local directory or ``.pth`` (``from_pretrained``), e.g. "gdino-shapes".
        model: an already loaded ``GroundingDinoForObjectDetection`` instead of ``model_path``.
        device: "cpu", "cuda", ... (SAHI's ``select_device``).
        confidence_threshold: keep a box whose score is above this.
        labels: the label list (category ids index it), or
        prompt: a phrase prompt ("a red circle. a blue star."; category ids index its phrases).
        text_threshold: phrase prompts only, as in ``detect`` (the model's default when None).
        load_at_init: load (or set) the model now, as SAHI's other classes do.

    Raises:
        ValueError: neither or both of ``labels`` and ``prompt``.
    """

    required_packages: ClassVar[list[str]] = ["torch", "sahi"]  # type: ignore[misc]

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        model: GroundingDinoForObjectDetection | None = None,
        device: str | None = None,
        confidence_threshold: float = 0.3,
        *,
        labels: list[str] | None = None,
        prompt: str | None = None,
        text_threshold: float | None = None,
        load_at_init: bool = True,
    ) -> None:
        if (labels is None) == (prompt is None):
            raise ValueError("give labels (a list of names) or prompt (a phrase prompt), one of them")
        self.text: str | list[str] = list(labels) if labels is not None else str(prompt)
        self.text_threshold = text_threshold
        path = None if model_path is None else os.fspath(model_path)
        super().__init__(
            model_path=path,
            model=model,
            device=device,
            confidence_threshold=confidence_threshold,
            load_at_init=load_at_init,
        )

    def load_model(self) -> None:
        """Loads ``model_path`` (the published checkpoint when None) onto the device."""
        name = self.model_path or DEFAULT_MODEL_ID
        self.set_model(GroundingDinoForObjectDetection.from_pretrained(name, device=str(self.device)).eval())

    def set_model(self, model: Any, **kwargs: Any) -> None:
        """Uses a loaded ``GroundingDinoForObjectDetection``; the categories are the prompt's phrases or labels."""
        if not isinstance(model, GroundingDinoForObjectDetection):
            raise TypeError(f"model must be a gdino GroundingDinoForObjectDetection, got {type(model).__name__}")
        self.model = model
        names = model.phrases(labels=self.text) if isinstance(self.text, list) else model.phrases(self.text)
        self.category_mapping = {str(i): name for i, name in enumerate(names)}

    @property
    def num_categories(self) -> int:
        return len(self.category_mapping or {})

    @property
    def has_mask(self) -> bool:
        return False

    @property
    def category_names(self) -> list[str]:
        return list((self.category_mapping or {}).values())

    def perform_inference(self, image: np.ndarray) -> None:
        """Detects in one (H, W, 3) RGB uint8 image."""
        self._original_predictions = [self._detect([image])[0]]

    def perform_batch_inference(self, images: list[np.ndarray]) -> None:
        """Detects in a batch of slices in one ``detect`` call: the prompt encoded once, the slices (of one
        size) through Swin, the encoder and the decoder together (``gdino.inference.tiled.detect_batched``)."""
        self._original_predictions = self._detect(images)
        self._original_shapes = [image.shape for image in images]

    def _detect(self, images: list[np.ndarray]) -> list[Detections]:
        if self.model is None:
            raise RuntimeError("the model is not loaded: call load_model() or set_model(model)")
        found = self.model.detect(
            [np.ascontiguousarray(image) for image in images],
            labels=self.text if isinstance(self.text, list) else None,
            prompt=self.text if isinstance(self.text, str) else None,
            box_threshold=self.confidence_threshold,
            text_threshold=self.text_threshold,
            batch_size=len(images),  # SAHI's slices are of one size: one pass through the whole model
        )
        assert isinstance(found, list)
        return found

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = None,
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        """Each image's ``Detections`` as SAHI ``ObjectPrediction``s, shifted by its slice's offset."""
        shifts = _per_image(shift_amount_list, [0, 0])
        shapes = _per_image(full_shape_list, None)
        per_image = []
        for i, found in enumerate(self._original_predictions or []):
            shift = [int(v) for v in shifts[min(i, len(shifts) - 1)]]
            shape = shapes[min(i, len(shapes) - 1)]
            boxes = _clip_to_full(found, shift, shape)
            per_image.append(
                [
                    ObjectPrediction(
                        bbox=[float(v) for v in box],
                        category_id=int(label_id),
                        category_name=label,
                        score=float(score),
                        shift_amount=shift,
                        full_shape=None if shape is None else [int(v) for v in shape],
                    )
                    for box, score, label, label_id in zip(boxes, found.scores, found.labels, found.label_ids)
                ]
            )
        self._object_prediction_list_per_image = per_image


def _clip_to_full(found: Detections, shift: list[int], full_shape: list[Any] | None) -> np.ndarray:
    """(N, 4) a slice's boxes, in its pixels, clipped to the full (height, width) image once shifted:
    as gdino's tiling clips them (``gdino.inference.tiles.to_image``), a box cut by the slice's border
    keeps what the model saw of it past that border."""
    boxes = np.asarray(found.boxes, np.float32).reshape(-1, 4)
    if full_shape is None:
        width, height = found.image_size
        return np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
    x, y = shift
    height, width = (int(v) for v in full_shape)
    return np.clip(boxes, np.array([-x, -y, -x, -y], np.float32), np.array([width - x, height - y] * 2, np.float32))


def _per_image(value: list[Any] | None, default: Any) -> list[Any]:
    """SAHI's shift or shape argument as one entry per image: ``[x, y]`` alone counts as one image's."""
    if value is None or len(value) == 0:
        return [default]
    if not isinstance(value[0], (list, tuple)):
        return [value]
    return list(value)
