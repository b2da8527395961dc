"""ONNX export: three graphs that take any image size and prompt, for ``gdino.runtime.onnx`` (no torch).

The detector is split where its inputs split, as ``GroundingDino``'s forward is:

* ``text.onnx``: ``input_ids``, ``attention_mask``, ``token_type_ids`` (B, T) -> ``text_features``
  (B, T, D), ``text_padding_mask`` (B, T), ``text_self_attention`` (B, T, T) (phrase blocks) and
  ``text_position_ids`` (B, T);
* ``image.onnx``: ``pixel_values`` (B, 3, H, W) -> ``level_0`` .. ``level_{L-1}`` (B, D, H_l, W_l),
  the projected multi-scale features (Swin and the input projections). Images of a batch have
  one size and no padding: the detector encodes every image at its own size (a padded batch
  would change Swin's output), and the runtime runs one image at a time;
* ``detection.onnx``: the levels, their masks ``mask_l`` (B, H_l, W_l) (True on the image) and the
  four text outputs -> ``logits`` (B, num_queries, max_text_len), ``boxes`` (B, num_queries, 4)
  (cx, cy, w, h relative) and ``query_index`` (B, num_queries), the image token behind each query.

Batch, image height and width and text length are dynamic (``torch.export`` with symbolic
shapes, through ``torch.onnx.export(dynamo=True)``): the deformable attention runs its
per-level ``grid_sample`` path (ONNX ``GridSample``), and the CPU inference steps (feed-forward
rows, Swin windows) are off while exporting. ``gdino_onnx.json`` holds what the runtime needs,
next to the tokenizer (``tokenizer.json``).
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
from torch import Tensor, nn
from torch.export import Dim

from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention
from gdino.models.grounding_dino.model import GroundingDino, ImageFeatures, TextFeatures
from gdino.runtime.onnx import SETTINGS_FILE

logger = logging.getLogger(__name__)

GRAPHS = ("text", "image", "detection")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TEXT_OUTPUTS = ("text_features", "text_padding_mask", "text_self_attention", "text_position_ids")
DEFAULT_OPSET = 18  # GridSample needs 16; the dynamo exporter writes 18 and up
# Example sizes the graphs are traced at: batch 2 and sizes above 1 (torch.export fixes dims of
# size 0 and 1), none of them the sizes the tests and users check.
_TRACE_IMAGE = (2, 3, 352, 480)
_TRACE_TOKENS = 9


class _TextGraph(nn.Module):
    def __init__(self, model: GroundingDino) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> tuple[Tensor, ...]:
        text = GroundingDino.text_features(self.model, input_ids, attention_mask, token_type_ids)  # no cache
        return text.features, text.padding_mask, text.self_attention, text.position_ids


class _ImageGraph(nn.Module):
    def __init__(self, model: GroundingDino) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        return tuple(m._project(m.backbone(pixel_values.to(next(m.backbone.parameters()).dtype))))


class _DetectionGraph(nn.Module):
    def __init__(self, model: GroundingDino) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        maps: tuple[Tensor, ...],
        masks: tuple[Tensor, ...],
        text_features: Tensor,
        text_padding_mask: Tensor,
        text_self_attention: Tensor,
        text_position_ids: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        text = TextFeatures(text_features, text_padding_mask, text_self_attention, text_position_ids)
        logits, boxes, index = self.model.detect_features(ImageFeatures(list(maps), list(masks)), text)
        return logits.float(), boxes.float(), index


def export_onnx(
    model: GroundingDino,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    image_settings: Any = None,
    opset: int = DEFAULT_OPSET,
    dtype: str = "fp32",
    quantize: str | None = None,
) -> dict[str, Any]:
    """Writes the three graphs, the tokenizer and ``gdino_onnx.json`` to ``out``.

    Args:
        model: a float32 model (``GroundingDinoForObjectDetection`` or ``GroundingDino``) on the CPU.
        tokenizer: the ``gdino.processing.text.TextTokenizer`` (the model's processor's by default).
        image_settings: the ``gdino.processing.image.ImageSettings`` (the model's processor's by default).
        opset: the ONNX opset (16 at least, for GridSample).
        dtype: "fp32", or "fp16" for Swin, BERT and the feature enhancer (as ``set_precision``),
            for GPU execution providers.
        quantize: None, or "int8" for dynamic int8 quantisation of the weights of matrix products.

    Returns:
        The settings written to ``gdino_onnx.json`` (with ``export_seconds`` and file sizes).
    """
    if opset < 16:
        raise ValueError(f"opset {opset} has no GridSample; give 16 or more")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"dtype must be fp32 or fp16, not {dtype!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be int8 or None, not {quantize!r}")
    if quantize and dtype == "fp16":
        raise ValueError(QUANTIZE_FP16)
    processor: Any = getattr(model, "processor", None)
    if processor is None and (tokenizer is None or image_settings is None):
        raise ValueError("the model has no processor: give tokenizer and image_settings")
    tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
    image_settings = image_settings if image_settings is not None else processor.image_settings
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = model.eval().float()
    if dtype == "fp16":
        model.set_precision(torch.float16)
    _use_grid_sample(model, True)
    try:
        with torch.no_grad():
            _export_graphs(model, directory, opset)
    finally:
        _use_grid_sample(model, False)
        if dtype == "fp16":
            model.float()
    if quantize == "int8":
        _quantize(directory)
    tokenizer._tok.save(str(directory / "tokenizer.json"))
    settings = _settings(model, tokenizer, image_settings, opset, dtype, quantize)
    settings["export_seconds"] = round(time.perf_counter() - start, 1)
    settings["file_sizes"] = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    logger.info("exported to %s in %.1f s", directory, settings["export_seconds"])
    return settings


QUANTIZE_FP16 = "--quantize int8 quantises the weights of an fp32 export; drop --dtype fp16 or --quantize"


def _use_grid_sample(model: nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.grid_sample = on


def _export_graphs(model: GroundingDino, directory: Path, opset: int) -> None:
    """Traces and writes text.onnx, image.onnx and detection.onnx, with dynamic shapes."""
    config = model.config
    batch = Dim("batch", min=1, max=64)
    tokens = Dim("tokens", min=2, max=config.max_text_len)
    ids = _example_ids(config.special_token_ids)
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    mask[0, -2:] = 0  # one padded prompt in the example
    text_shapes = {name: {0: batch, 1: tokens} for name in TEXT_INPUTS}
    _export(
        _TextGraph(model), (ids, mask, types), directory / "text.onnx", TEXT_INPUTS, TEXT_OUTPUTS, text_shapes, opset
    )

    pixels = torch.randn(*_TRACE_IMAGE)
    height, width = Dim("height", min=32, max=8192), Dim("width", min=32, max=8192)
    levels = [f"level_{i}" for i in range(config.num_feature_levels)]
    image_shapes = {"pixel_values": {0: batch, 2: height, 3: width}}
    _export(_ImageGraph(model), (pixels,), directory / "image.onnx", ("pixel_values",), levels, image_shapes, opset)

    maps = _ImageGraph(model)(pixels)
    text = _TextGraph(model)(ids, mask, types)
    masks = tuple(torch.ones(m.shape[0], *m.shape[2:], dtype=torch.bool) for m in maps)
    sizes = [(Dim(f"height_{i}", min=1, max=4096), Dim(f"width_{i}", min=1, max=4096)) for i in range(len(maps))]
    detection_shapes = {
        "maps": tuple({0: batch, 2: h, 3: w} for h, w in sizes),
        "masks": tuple({0: batch, 1: h, 2: w} for h, w in sizes),
        "text_features": {0: batch, 1: tokens},
        "text_padding_mask": {0: batch, 1: tokens},
        "text_self_attention": {0: batch, 1: tokens, 2: tokens},
        "text_position_ids": {0: batch, 1: tokens},
    }
    names = (*levels, *(f"mask_{i}" for i in range(len(maps))), *TEXT_OUTPUTS)
    _export(
        _DetectionGraph(model),
        (maps, masks, *text),
        directory / "detection.onnx",
        names,
        ("logits", "boxes", "query_index"),
        detection_shapes,
        opset,
    )


def _example_ids(special: tuple[int, ...]) -> Tensor:
    """(2, _TRACE_TOKENS) example prompts: [CLS] words with "." between phrases [SEP]."""
    cls, sep, dot = special[0], special[1], special[2]
    words = [2000 + i for i in range(_TRACE_TOKENS - 2)]
    row = [cls, *words[:3], dot, *words[3:5], dot, sep]
    return torch.tensor([row, [cls, *words[:6], dot, sep]][:2], dtype=torch.long)[:, :_TRACE_TOKENS]


def _export(
    graph: nn.Module, args: tuple[Any, ...], path: Path, inputs: Any, outputs: Any, shapes: dict[str, Any], opset: int
) -> None:
    start = time.perf_counter()
    program = torch.onnx.export(
        graph.eval(),
        args,
        input_names=list(inputs),
        output_names=list(outputs),
        dynamic_shapes=shapes,
        dynamo=True,
        opset_version=opset,
        verbose=False,
    )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    program.save(str(path), external_data=False)
    logger.info("wrote %s in %.1f s", path.name, time.perf_counter() - start)


def _quantize(directory: Path) -> None:
    """Dynamic int8 quantisation of every graph's MatMul weights, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in GRAPHS:
        path = directory / f"{name}.onnx"
        tmp = path.with_suffix(".int8.onnx")
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        os.replace(tmp, path)


def _settings(model: GroundingDino, tokenizer: Any, image: Any, opset: int, dtype: str, quantize: str | None) -> dict:
    """What ``gdino.runtime.onnx`` needs besides the graphs: image settings, text limits and defaults."""
    config = model.config
    return {
        "format": 1,
        "graphs": {name: f"{name}.onnx" for name in GRAPHS},
        "tokenizer": "tokenizer.json",
        "image": asdict(image),
        "max_text_len": config.max_text_len,
        "num_queries": config.num_queries,
        "num_feature_levels": config.num_feature_levels,
        "special_token_ids": list(config.special_token_ids),
        "pad_token_id": tokenizer.pad_token_id,
        **config.detection_defaults(),  # detect's thresholds when the caller gives none
        "opset": opset,
        "dtype": dtype,
        "quantize": quantize,
    }
