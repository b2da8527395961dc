"""Tiled detection with the PyTorch model: the passes of ``gdino.inference.tiles``, batched.

Every image's tiles (and, unless ``TileSettings.full_image`` is off, the whole image) are passes.
Passes of the same pixel size and prompt go through the processor, Swin and the input projections
together, ``batch_size`` at a time, so memory is bounded by the batch, not by the number of tiles;
each prompt (each chunk of a label list) is encoded once per request (the detector's prompt cache)
and its features are expanded over the batch; a label list's chunks all reuse the batch's image
features. Each pass is decoded exactly as ``detect`` decodes an image (thresholds, NMS), its boxes
mapped back onto the image and merged as SAHI merges (``merge_tiles``).

With ``batch_size=1`` a tiled result equals the merge of ``detect`` run on each tile crop (and on
the whole image), bit for bit; in larger batches matrix products may round differently (1e-6).

Unlike SAHI's ``get_sliced_prediction``, which switches greedy NMM to NMS (by IoU) when the
confidence threshold is under 0.1 unless ``force_postprocess_type`` is given, the merge rule is
never switched: the rule a user chose is the rule run, and equal settings give equal results
whatever the threshold. The reason for SAHI's switch is real (a large weak box merged by IoS
grows the good box it contains to its own extent), so ``detect`` warns once of that combination.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.pipeline import ChunkCallback, PhraseQuery, Query, Thresholds
from gdino.inference.postprocess import (
    best_per_query,
    chunk_scores,
    class_detections,
    nms_detections,
    phrase_detections,
)
from gdino.inference.tiles import Tile, TileSettings, merge_tiles, needs_full_pass, tile_grid, to_image
from gdino.models.grounding_dino.features import ImageFeatures, TextFeatures
from gdino.processing.classes import ClassQuery

log = logging.getLogger(__name__)

LOW_CONFIDENCE = 0.1  # SAHI's LOW_MODEL_CONFIDENCE: below it, greedy merging is warned of


class TiledModel(Protocol):
    """What tiled detection needs of the detector (``GroundingDinoForObjectDetection``)."""

    processor: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def image_features(self, pixel_values: torch.Tensor) -> ImageFeatures: ...

    def text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> TextFeatures: ...

    def detect_features(
        self, image: ImageFeatures, text: TextFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Pass:
    """One model pass of tiled detection: image ``image``'s ``region`` (None: the whole image)."""

    image: int
    region: Tile | None
    size: tuple[int, int]  # (width, height) of the crop


def check_tiles(sizes: Sequence[tuple[int, int]], settings: TileSettings) -> list[list[Tile]]:
    """Each (width, height) image's tiles, after checking that a tile fits in every image.

    Raises:
        ValueError: a tile larger than an image's longer side (it would be the whole image).
    """
    for width, height in sizes:
        if settings.size > max(width, height):
            raise ValueError(
                f"tile size {settings.size} is over the {width}x{height} image; give a tile of at most "
                f"{max(width, height)} pixels, or detect without tiles"
            )
    return [tile_grid(width, height, settings) for width, height in sizes]


def tile_count(sizes: Sequence[tuple[int, int]], settings: TileSettings) -> int:
    """How many passes tiled detection of images of these (width, height) sizes runs (tiles and whole images)."""
    grids = check_tiles(sizes, settings)
    return sum(len(tiles) + needs_full_pass(tiles, settings) for tiles in grids)


def plan_passes(
    grids: Sequence[Sequence[Tile]], sizes: Sequence[tuple[int, int]], settings: TileSettings
) -> list[Pass]:
    """Every pass: all images' tiles in order, then the whole images that need a pass of their own."""
    passes = [Pass(i, tile, (tile[2] - tile[0], tile[3] - tile[1])) for i, tiles in enumerate(grids) for tile in tiles]
    passes += [Pass(i, None, sizes[i]) for i, tiles in enumerate(grids) if needs_full_pass(tiles, settings)]
    return passes


def batches(passes: Sequence[Pass], queries: Sequence[Query], batch_size: int) -> Iterator[list[Pass]]:
    """The passes in batches of at most ``batch_size`` that share a crop size and a query."""
    groups: dict[tuple[tuple[int, int], int], list[Pass]] = {}
    for p in passes:
        groups.setdefault((p.size, _query_key(queries, p.image)), []).append(p)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def _query_key(queries: Sequence[Query], image: int) -> int:
    """The first image whose query equals ``image``'s: passes of equal queries can share a batch."""
    return next(i for i in range(image + 1) if queries[i] == queries[image])


def detect_tiled(
    model: TiledModel,
    pictures: Sequence[Image.Image],
    queries: Sequence[Query],
    thresholds: Thresholds,
    settings: TileSettings,
    batch_size: int = 1,
    callback: ChunkCallback | None = None,
) -> list[Detections]:
    """Each picture's detections for its query, from its tiles (and itself), merged (module docstring).

    Raises:
        ValueError: a tile larger than a picture, or a batch size under 1, before any model work.
    """
    _check_batch_size(batch_size)
    sizes = [p.size for p in pictures]
    grids = check_tiles(sizes, settings)
    if settings.merge == "greedynmm" and thresholds.box < LOW_CONFIDENCE:
        _warn_low_confidence(thresholds.box)
    found = run_passes(model, pictures, plan_passes(grids, sizes, settings), queries, thresholds, batch_size, callback)
    return [
        merge_tiles([found[(i, t)] for t in tiles], tiles, sizes[i], settings, _clipped(found.get((i, None))))
        for i, tiles in enumerate(grids)
    ]


def detect_batched(
    model: TiledModel,
    pictures: Sequence[Image.Image],
    queries: Sequence[Query],
    thresholds: Thresholds,
    batch_size: int,
    callback: ChunkCallback | None = None,
) -> list[Detections]:
    """Each picture's detections for its query, pictures of one size and query through the whole
    model ``batch_size`` at a time (SAHI's slices, a folder of one camera's frames), no tiling.

    Faster than one at a time, but a picture's detections may then depend on its batch: batched
    matrix products round differently (1e-7), which can swap two near-tied proposals in the query
    selection (``gdino.inference.pipeline.detect_queries`` runs images alone for that reason).

    Raises:
        ValueError: a batch size under 1.
    """
    _check_batch_size(batch_size)
    passes = [Pass(i, None, p.size) for i, p in enumerate(pictures)]
    found = run_passes(model, pictures, passes, queries, thresholds, batch_size, callback)
    return [found[(i, None)] for i in range(len(pictures))]


def run_passes(
    model: TiledModel,
    pictures: Sequence[Image.Image],
    passes: Sequence[Pass],
    queries: Sequence[Query],
    thresholds: Thresholds,
    batch_size: int,
    callback: ChunkCallback | None,
) -> dict[tuple[int, Tile | None], Detections]:
    """Every pass's detections in the pass's own pixels, by (image, region); batched by ``batches``."""
    planned = list(batches(passes, queries, batch_size))
    steps = _Steps(callback, sum(_passes_per_batch(queries[b[0].image]) for b in planned))
    found: dict[tuple[int, Tile | None], Detections] = {}
    for batch in planned:
        crops = [pictures[p.image] if p.region is None else pictures[p.image].crop(p.region) for p in batch]
        for p, detections in zip(batch, _detect_batch(model, crops, queries[batch[0].image], thresholds, steps)):
            found[(p.image, p.region)] = detections
    steps.finish()
    return found


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of 1 or more, got {batch_size!r}")


def _clipped(full: Detections | None) -> Detections | None:
    """The whole image's detections with their boxes clipped to it, as the tiles' are (``to_image``)."""
    if full is None:
        return None
    width, height = full.image_size
    return to_image(full, (0, 0, width, height), full.image_size)


@lru_cache(maxsize=8)
def _warn_low_confidence(threshold: float) -> None:
    log.warning(
        "tiles merged by greedynmm with box_threshold %.3g: weak boxes may grow the good boxes they hold "
        "(SAHI switches to nms below %.1f; give merge='nms' for that)",
        threshold,
        LOW_CONFIDENCE,
    )


def _passes_per_batch(query: Query) -> int:
    return len(query.prompts) if isinstance(query, ClassQuery) else 1


class _Steps:
    """The ``on_chunk`` callback over a tiled request: ``(done, total)`` passes of the decoder."""

    def __init__(self, callback: ChunkCallback | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total)
        self.done += 1

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(self.total, self.total)


def _detect_batch(
    model: TiledModel, crops: list[Image.Image], query: Query, thresholds: Thresholds, steps: _Steps
) -> list[Detections]:
    """Detections of B crops of one size for one query: one Swin pass, one decoder pass per prompt."""
    pixels = model.processor(images=crops)["pixel_values"].to(model.device, model.dtype)  # (B, 3, H, W)
    image = model.image_features(pixels)
    sizes = [c.size for c in crops]
    if isinstance(query, PhraseQuery):
        steps.step()
        logits, boxes = _run(model, image, query.text)
        return [_phrases(query, logits[j], boxes[j], size, thresholds) for j, size in enumerate(sizes)]
    chunks: list[list[Any]] = [[] for _ in crops]
    for prompt in query.prompts:
        steps.step()
        logits, boxes = _run(model, image, prompt.text)
        for j, row in enumerate(chunks):
            row.append(chunk_scores(logits[j], boxes[j], prompt))
    return [
        class_detections(best_per_query(row), query.names, size, thresholds.box, thresholds.nms)
        for row, size in zip(chunks, sizes)
    ]


def _phrases(
    query: PhraseQuery, logits: np.ndarray, boxes: np.ndarray, size: tuple[int, int], thresholds: Thresholds
) -> Detections:
    found = phrase_detections(logits, boxes, query.spans, query.names, size, thresholds.box, thresholds.text)
    return found if thresholds.nms is None else nms_detections(found, thresholds.nms)


def _run(model: TiledModel, image: ImageFeatures, text: str) -> tuple[np.ndarray, np.ndarray]:
    """One decoder pass of a batch: (B, Q, T) float32 token logits and (B, Q, 4) relative boxes."""
    tokens = model.processor.tokenizer.encode([text])
    device = model.device
    encoded = model.text_features(
        tokens.input_ids.to(device), tokens.attention_mask.to(device), tokens.token_type_ids.to(device)
    )
    logits, boxes, _ = model.detect_features(image, _expand(encoded, image.maps[0].shape[0]))
    return logits.float().cpu().numpy(), boxes.float().cpu().numpy()


def _expand(text: TextFeatures, batch: int) -> TextFeatures:
    """One prompt's features (1, T, ...) repeated over a batch of ``batch`` images."""
    if batch == 1:
        return text
    return TextFeatures(
        text.features.expand(batch, -1, -1),  # (B, T, D)
        text.padding_mask.expand(batch, -1),  # (B, T)
        text.self_attention.expand(batch, -1, -1),  # (B, T, T)
        text.position_ids.expand(batch, -1),  # (B, T)
    )
