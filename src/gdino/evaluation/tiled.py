"""``gdino eval coco --tile SIZE``: the COCO protocol on tiles (``gdino.inference.tiled``).

Every category name is prompted (in chunks, as ``ModelDetector``) on each tile and, unless
``full_image`` is off, on the whole image; each query keeps its best category when that scores above
``EVAL_TILE_THRESHOLD``, the boxes are merged as SAHI merges, and the ``max_dets`` best are kept.
The original protocol's top-k over every (query, category) pair does not survive the merge: a
query's second category would be merged into its first (same box, other label, never merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from gdino.evaluation.coco import Found
from gdino.inference.pipeline import Thresholds
from gdino.inference.tiled import detect_tiled
from gdino.inference.tiles import TileSettings
from gdino.processing.classes import label_query

if TYPE_CHECKING:
    from gdino.inference.detector import GroundingDinoForObjectDetection

# A box of a tile is kept above this score. SAHI's own switch point (it merges by NMS below it): weak,
# large boxes merged by greedy NMM would grow the good boxes they contain into their own extent.
EVAL_TILE_THRESHOLD = 0.1


class TiledModelDetector:
    """The tiled protocol with a model (module docstring): a ``Detector`` for ``evaluate_coco``.

    Attributes:
        chunks: the prompts (encoder and decoder passes) each tile needs for the names.
    """

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        names: Sequence[str],
        tiles: TileSettings,
        max_dets: int = 300,
        batch_size: int = 4,
    ) -> None:
        self.model, self.tiles, self.max_dets, self.batch_size = model, tiles, max_dets, batch_size
        self.query = label_query(names, model.processor.tokenizer)
        self.chunks = len(self.query.prompts)

    def __call__(self, image: np.ndarray, info: dict[str, Any]) -> Found:
        del info
        thresholds = Thresholds(EVAL_TILE_THRESHOLD, 0.0)
        with torch.inference_mode():
            found = detect_tiled(
                self.model, [Image.fromarray(image)], [self.query], thresholds, self.tiles, self.batch_size
            )[0]
        keep = slice(0, self.max_dets)  # best first
        return found.boxes[keep], found.scores[keep], np.asarray(found.label_ids, np.int64)[keep]
