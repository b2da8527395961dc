"""What a fine-tune learned and what it kept: AP50 on the new concepts, the old seen and held-out pairs.

    from gdino.training.forgetting import score_forgetting
    scores = score_forgetting(model, "out-forget/data")   # ForgettingScores(new=0.86, seen=0.91, held_out=0.93)

Each figure is the mean per-pair COCO AP50 (IoU 0.5, all areas) over the pairs of its group that the
images hold, on the benchmark's never-seen splits (``gdino.training.forgetting_data``): ``new`` on the
new-concept pairs of the ``new`` split (prompted with every pair, old and new), ``seen`` on the old
seen pairs of ``val``, ``held_out`` on the old held-out pairs of ``held_out``. Mean per pair rather
than the COCO overall figure so that each concept counts once, however often it was drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from gdino.evaluation.coco import evaluate_coco, model_detector
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.training.forgetting_data import new_pair_names, seen_pairs


@dataclass(frozen=True)
class ForgettingScores:
    """Mean per-pair AP50: ``new`` concepts (learned), old ``seen`` and ``held_out`` pairs (kept)."""

    new: float
    seen: float
    held_out: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def mean_ap50(per_category: dict[str, dict[str, float]], pairs: list[str]) -> float:
    """Mean AP50 over ``pairs`` that the images hold (pycocotools gives -1 for a pair with no box);
    NaN when they hold none."""
    found = [per_category[p]["AP50"] for p in pairs if p in per_category and per_category[p]["AP50"] >= 0]
    return sum(found) / len(found) if found else float("nan")


def score_forgetting(
    model: GroundingDinoForObjectDetection, data: str | Path, limit: int | None = None, log: IO[str] | None = None
) -> ForgettingScores:
    """The three figures of ``model`` on the benchmark in ``data`` (the folder
    ``write_forgetting_dataset`` wrote), each on its split's first ``limit`` images (all when None)."""
    root = Path(data)
    held = json.loads((root / "held_out.json").read_text())["info"]["held_out"]
    groups = {"new": ("new", new_pair_names()), "seen": ("val", seen_pairs(held)), "held_out": ("held_out", held)}
    was_training = model.training
    model.eval()
    try:
        figures = {name: _split_ap50(model, root, split, pairs, limit, log) for name, (split, pairs) in groups.items()}
    finally:
        model.train(was_training)
    return ForgettingScores(**figures)


def _split_ap50(
    model: GroundingDinoForObjectDetection, root: Path, split: str, pairs: list[str], limit: int | None, log: Any
) -> float:
    result = evaluate_coco(
        root, root / f"{split}.json", lambda names: model_detector(model, names), limit=limit, log=log
    )
    return mean_ap50(result.per_category, pairs)
