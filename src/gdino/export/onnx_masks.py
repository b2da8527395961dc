"""The segmenter's two graphs for an ONNX export (``gdino export onnx --masks MODEL``).

Added to a detector export's folder, for ``gdino.runtime.onnx.OnnxSegmenter`` (no torch):

* ``segmenter_image.onnx``: ``pixel_values`` (1, 3, S, S), the image as ``gdino.processing.sam_image``
  prepares it -> SAM 2.1: ``image_embed`` (1, C, e, e), ``high_res_0`` (1, C/8, 4e, 4e) and
  ``high_res_1`` (1, C/4, 2e, 2e) (``Sam2.encode_image``); SAM: ``image_embeddings`` (1, C, g, g) and,
  for SAM-HQ, ``intermediate_embeddings`` (1, g, g, W);
* ``segmenter_decoder.onnx``: those outputs and ``boxes`` (1, P, 4), x0 y0 x1 y1 in pixels of the
  model's input, P dynamic -> ``masks`` (P, 1, h, w) logits and ``scores`` (P,) (predicted IoU), with
  ``multimask_output=False``. SAM 2.1's masks are the decoder's (4e x 4e, one bilinear resize from the
  image); SAM's are already resized to the padded square (``low_res_frame`` before its crop), so the
  runtime crops and resizes each mask as ``Segmenter`` does (``gdino.inference.mask_resize``).

``gdino_onnx.json`` gains ``"segmenter"``: the family, the graph files, the image settings
(``SamImageSettings``: size, normalisation), the box coordinates' precision and the mask threshold.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from gdino.export.onnx import _export
from gdino.inference.segmenter import Segmenter
from gdino.models.sam.model import Sam
from gdino.models.sam2.model import ImageEmbeddings, Sam2
from gdino.runtime.onnx import SETTINGS_FILE

logger = logging.getLogger(__name__)

SEGMENTER_GRAPHS = {"image": "segmenter_image.onnx", "decoder": "segmenter_decoder.onnx"}
MASK_THRESHOLD = 0.0  # logits above it are the mask, as Segmenter and post_process_masks threshold
_TRACE_BOXES = 3  # torch.export fixes dims of size 0 and 1
_SAM2_OUTPUTS = ("image_embed", "high_res_0", "high_res_1")
_SAM_OUTPUTS = ("image_embeddings", "intermediate_embeddings")  # the second for SAM-HQ only


class _Sam2Image(nn.Module):
    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        encoded = self.model.encode_image(pixel_values)
        return encoded.image_embed, *encoded.high_res_feats


class _Sam2Decoder(nn.Module):
    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embed: Tensor, high_res_0: Tensor, high_res_1: Tensor, boxes: Tensor) -> tuple[Tensor, ...]:
        encoded = ImageEmbeddings(image_embed, (high_res_0, high_res_1))
        out = self.model.decode(encoded, boxes=boxes, multimask_output=False)
        return out.pred_masks[0].float(), out.iou_scores[0, :, 0].float()  # (P, 1, 4e, 4e), (P,)


class _SamImage(nn.Module):
    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        encoded = self.model.encode_image(pixel_values)
        extra = encoded.intermediate_embeddings
        return (encoded.image_embeddings,) if extra is None else (encoded.image_embeddings, extra)


class _SamDecoder(nn.Module):
    def __init__(self, model: Sam, side: int) -> None:
        super().__init__()
        self.model = model
        self.side = side

    def forward(self, image_embeddings: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        return self.decode(image_embeddings, None, boxes)

    def decode(self, image: Tensor, intermediate: Tensor | None, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """(P, 1, pad, pad) mask logits in the padded square's frame and (P,) scores."""
        out = self.model(
            image_embeddings=image, intermediate_embeddings=intermediate, input_boxes=boxes, multimask_output=False
        )
        masks = F.interpolate(out.pred_masks[0].float(), (self.side, self.side), mode="bilinear", align_corners=False)
        return masks, out.iou_scores[0, :, 0].float()


class _SamHqDecoder(_SamDecoder):
    def forward(  # type: ignore[override]  # SAM-HQ's early features are one more input
        self, image_embeddings: Tensor, intermediate_embeddings: Tensor, boxes: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.decode(image_embeddings, intermediate_embeddings, boxes)


def export_segmenter_onnx(segmenter: Segmenter, out: str | os.PathLike[str], opset: int = 18) -> dict[str, Any]:
    """Writes the segmenter's image and decoder graphs into the export ``out`` and adds their settings
    to its ``gdino_onnx.json`` (``export_onnx`` writes that first).

    Args:
        segmenter: a float32 ``Segmenter`` on the CPU (SAM 2.1, SAM or SAM-HQ).
        out: the detector export's folder.
        opset: the ONNX opset, as the detector's graphs.

    Returns:
        The ``"segmenter"`` settings written.
    """
    directory = Path(out)
    path = directory / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: export the detector into {directory} first")
    start = time.perf_counter()
    model = segmenter.model.float().eval()
    square = segmenter.settings.square
    side = segmenter.settings.pad_size
    pixels = torch.randn(1, 3, side, side)
    image_graph: nn.Module = _Sam2Image(model) if isinstance(model, Sam2) else _SamImage(model)
    with torch.no_grad():
        encoded = image_graph(pixels)
        names: tuple[str, ...] = _SAM2_OUTPUTS if isinstance(model, Sam2) else _SAM_OUTPUTS[: len(encoded)]
        image_file = directory / SEGMENTER_GRAPHS["image"]
        _export(image_graph, (pixels,), image_file, ("pixel_values",), names, {"pixel_values": {}}, opset)
        decoder = _decoder(model, side, len(encoded))
        boxes = torch.tensor([[[4.0, 6.0, side / 2, side / 3], [0, 0, side, side], [side / 4, 10, side - 8, side]]])
        shapes: dict[str, Any] = {name: {} for name in names} | {"boxes": {1: Dim("boxes", min=1, max=4096)}}
        outputs = ("masks", "scores")
        _export(
            decoder,
            (*encoded, boxes),
            directory / SEGMENTER_GRAPHS["decoder"],
            (*names, "boxes"),
            outputs,
            shapes,
            opset,
        )
    _check_dynamic_boxes(directory / SEGMENTER_GRAPHS["decoder"])
    entry = {
        "family": "sam2" if square else "sam",
        "graphs": dict(SEGMENTER_GRAPHS),
        "image": asdict(segmenter.settings),
        "coordinate_dtype": segmenter.processor.coordinate_dtype.__name__,
        "mask_threshold": MASK_THRESHOLD,
        "batch_size": segmenter.batch_size,
        "export_seconds": round(time.perf_counter() - start, 1),
    }
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["segmenter"] = entry
    settings["file_sizes"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    logger.info("exported the segmenter to %s in %.1f s", directory, entry["export_seconds"])
    return entry


def _check_dynamic_boxes(path: Path) -> None:
    """Refuses a decoder graph whose box count was fixed while tracing (the exporter falls back to
    the traced size, with a warning only, when a module's code fixes it)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = next(i for i in graph.input if i.name == "boxes").type.tensor_type.shape.dim
    if not dims[1].dim_param:
        raise RuntimeError(f"{path.name}: the number of boxes was fixed at {dims[1].dim_value} while exporting")


def _decoder(model: Sam2 | Sam, side: int, image_outputs: int) -> nn.Module:
    """The decoder graph's module for the model's family (SAM-HQ: its image graph gives two outputs)."""
    if isinstance(model, Sam2):
        return _Sam2Decoder(model)
    return _SamHqDecoder(model, side) if image_outputs > 1 else _SamDecoder(model, side)
