"""``Segmenter``: a mask for every box, from SAM 2.1, SAM or SAM-HQ (grounded segmentation).

``segment(image, boxes)`` encodes the image once and decodes its boxes in batches
(``batch_size``), one mask each (``multimask_output=False``, as Grounded-SAM-2 does). Each box's
mask logits are brought to the original image's size alone, and only over the part of the image
where they can be positive (``gdino.inference.mask_resize``), then thresholded at 0 and kept as a
crop (``Masks``): 200 boxes on a 4000 x 3000 image never make an (N, H, W) array. The scores are
the decoder's predicted IoU. Preprocessing is the processors' (``gdino.processing.sam_image``).

```python
seg = Segmenter.from_pretrained("facebook/sam2.1-hiera-tiny")
found = detector.detect(image, "a cat.", segmenter=seg)  # Detections with masks and mask_scores
masks, scores = seg.segment(image, boxes)               # boxes (N, 4) x0 y0 x1 y1 in image pixels
```
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdino.checkpoint.sam2_loading import load_sam2
from gdino.checkpoint.sam_loading import load_sam
from gdino.inference.detections import Detections
from gdino.inference.mask_resize import check_boxes, clip_boxes, resize_positive
from gdino.inference.masks import Masks
from gdino.models.sam.model import Sam
from gdino.models.sam2.model import Sam2
from gdino.processing.image import ImageLike, load_image
from gdino.processing.sam2_processor import Sam2Processor
from gdino.processing.sam_image import SamImageSettings, image_pixels, low_res_frame, read_settings
from gdino.processing.sam_processor import SamProcessor
from gdino.processing.segment_processor import SegmentProcessor
from gdino.utils.hub import PACKAGED_MODELS, Checkpoint, CheckpointError, resolve

DEFAULT_SEGMENTER = "facebook/sam2.1-hiera-tiny"
_SAM2_TYPES = {"sam2", "sam2_video"}
_SAM_TYPES = {"sam", "sam_hq"}


@dataclass(frozen=True)
class _Encoded:
    """One image's embeddings, in the form its model's decoder takes."""

    embeddings: Any
    original: tuple[int, int]  # (height, width)
    resized: tuple[int, int]


class Segmenter:
    """A SAM 2.1 or SAM / SAM-HQ model with its preprocessing, for box prompts."""

    def __init__(self, model: Sam2 | Sam, settings: SamImageSettings | None = None, batch_size: int = 32) -> None:
        """
        Args:
            model: the loaded model (``load_sam2`` or ``load_sam``).
            settings: its image preprocessing; by default the published models' at the model's input size.
            batch_size: boxes decoded together.
        """
        side = model.config.image_size if isinstance(model, Sam2) else model.config.vision.image_size
        if settings is None:
            settings = SamImageSettings(square=isinstance(model, Sam2), size=side, pad_size=side)
        if settings.pad_size != side or settings.square != isinstance(model, Sam2):
            raise ValueError(f"the image settings ({settings}) do not fit the model's {side} x {side} input")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.processor: SegmentProcessor = (Sam2Processor if settings.square else SamProcessor)(settings)
        self.batch_size = batch_size

    @property
    def settings(self) -> SamImageSettings:
        """The processor's image settings."""
        return self.processor.settings

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = DEFAULT_SEGMENTER,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
    ) -> Segmenter:
        """Loads a hub id (Hugging Face layout), a local directory, an original ``.pt`` / ``.pth`` file
        or the packaged ``"gdino-shapes-sam"``; the family (SAM 2.1, SAM, SAM-HQ) is read from the
        ``config.json``'s ``model_type``, else from the tensors' names.

        Raises:
            CheckpointError: nothing found under that name, a file of another family (a detector), a
                truncated file, or tensors that do not fit (named).
        """
        checkpoint = _resolve(model)
        path = Path(model).expanduser()
        local = path if path.exists() else (checkpoint.directory or checkpoint.weights)
        family = _family(checkpoint.weights, checkpoint.directory)
        net: Sam2 | Sam = (
            load_sam2(local, device=device, dtype=dtype)
            if family == "sam2"
            else load_sam(local, device=device, dtype=dtype)
        )
        settings = None
        if checkpoint.directory is not None and (checkpoint.directory / "preprocessor_config.json").is_file():
            settings = read_settings(checkpoint.directory, square=family == "sam2")
        return cls(net, settings, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def segment(self, image: ImageLike, boxes: np.ndarray) -> tuple[Masks, np.ndarray]:
        """One mask per box, at the image's original size.

        Args:
            image: a PIL image, a uint8 array (H, W, 3) or a path.
            boxes: (N, 4) x0 y0 x1 y1 in pixels of the image; clipped to the image first.

        Returns:
            N masks (``Masks``, cropped to their bounds) and (N,) float32 scores (predicted IoU).

        Raises:
            ValueError: boxes that are not (N, 4) finite numbers.
            ImageError: an image that cannot be read.
        """
        boxes = check_boxes(boxes)
        picture = load_image(image)
        size = (picture.width, picture.height)
        if len(boxes) == 0:
            return Masks.empty(size), np.zeros(0, np.float32)
        encoded = self._encode(picture)
        clipped = clip_boxes(boxes, size)
        crops: list[tuple[np.ndarray, tuple[int, int]]] = []
        scores = []
        for start in range(0, len(clipped), self.batch_size):
            logits, iou = self._decode(encoded, clipped[start : start + self.batch_size])
            scores.append(iou.float().cpu().numpy())
            for i in range(logits.shape[0]):  # one mask at a time: SAM's frame is the padded square's size
                frame, _ = low_res_frame(logits[i : i + 1].float(), self.settings, encoded.resized)  # (1, 1, h, w)
                crops.append(resize_positive(frame[0, 0].cpu().numpy(), encoded.original))
        return Masks.from_crops(crops, size), np.concatenate(scores).astype(np.float32)

    def add_masks(self, image: ImageLike, found: Detections) -> Detections:
        """``found`` with a mask and mask score for each of its boxes."""
        return found.with_masks(*self.segment(image, found.boxes))

    def _encode(self, picture: Any) -> _Encoded:
        pixels, resized = image_pixels(picture, self.settings)
        values = torch.from_numpy(pixels)[None].to(self.device, self.dtype)  # (1, 3, S, S)
        return _Encoded(self.model.encode_image(values), (picture.height, picture.width), resized)

    def _decode(self, encoded: _Encoded, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (P, 4) in image pixels -> mask logits (P, 1, h, w) and scores (P,)."""
        scaled = self.processor.scale_boxes(boxes, encoded.original)  # (P, 4) in the model's input
        prompts = torch.from_numpy(scaled)[None].to(self.device, self.dtype)  # (1, P, 4)
        if isinstance(self.model, Sam2):
            out = self.model.decode(encoded.embeddings, boxes=prompts, multimask_output=False)
        else:
            image = encoded.embeddings
            out = self.model(
                image_embeddings=image.image_embeddings,
                intermediate_embeddings=image.intermediate_embeddings,
                input_boxes=prompts,
                multimask_output=False,
            )
        return out.pred_masks[0], out.iou_scores[0, :, 0]


def load_segmenter(
    model: str | os.PathLike[str] = DEFAULT_SEGMENTER,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
) -> Segmenter:
    """``Segmenter.from_pretrained``."""
    return Segmenter.from_pretrained(model, device=device, dtype=dtype, batch_size=batch_size)


def _resolve(model: str | os.PathLike[str]) -> Checkpoint:
    """``resolve``, its refusals worded for a segmenter (they name the detector's files otherwise)."""
    try:
        return resolve(model)
    except CheckpointError as error:
        if str(model) in PACKAGED_MODELS:
            raise
        reason = str(error).split(";")[0].split(" (nor is it")[0]
        raise CheckpointError(
            f"{reason}; a segmenter is a SAM 2.1, SAM or SAM-HQ hub id ({DEFAULT_SEGMENTER!r}), a folder with "
            "config.json and model.safetensors, an original .pt / .pth file, or 'gdino-shapes-sam'"
        ) from None


def _family(weights: Path, directory: Path | None) -> str:
    """ "sam2" or "sam": from config.json's model_type, else the tensors' names.

    Raises:
        CheckpointError: config.json names another model, or the tensors are no segmenter's.
    """
    config = directory / "config.json" if directory is not None else None
    if config is not None and config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"cannot read {config}: {e}") from None
        if model_type in _SAM2_TYPES:
            return "sam2"
        if model_type in _SAM_TYPES:
            return "sam"
        known = ", ".join(sorted(_SAM2_TYPES | _SAM_TYPES))
        raise CheckpointError(f"{config} has model_type {model_type!r}, not a segmenter's ({known})")
    names = _tensor_names(weights)
    if names is None:  # unreadable: the loader names the file and the reason
        return "sam2"
    if any(".trunk." in n or n.startswith(("vision_encoder.backbone.", "sam_mask_decoder.")) for n in names):
        return "sam2"
    if any(n.removeprefix("module.").startswith(("image_encoder.", "vision_encoder.")) for n in names):
        return "sam"
    shown = ", ".join(sorted(names)[:3]) or "no tensors"
    raise CheckpointError(
        f"{weights} is not a SAM 2.1, SAM or SAM-HQ checkpoint: its tensors ({shown}, ...) hold no image encoder "
        "of theirs"
    )


def _tensor_names(weights: Path) -> list[str] | None:
    """The file's tensor names without reading the tensors; None when it cannot be read."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                return list(f.keys())
        raw = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (a truncated or foreign file: the loader reports it)
        return None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    return [str(k) for k in raw] if isinstance(raw, dict) else None
