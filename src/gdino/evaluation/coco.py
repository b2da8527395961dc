"""Zero-shot COCO evaluation, as the original repository runs it (``demo/test_ap_on_coco.py``).

Every category name of the annotation file is in the prompt (in chunks when they are over 256
tokens), each category is scored by the mean probability of its tokens, the ``max_dets`` (300)
best (box, category) pairs of each image are kept (a box may count for several categories), and
pycocotools computes the standard 12 numbers. Needs the ``eval`` extra (``pip install
'gdino[eval]'``). With a segmenter (``gdino eval coco --masks MODEL``) each kept box is also
segmented (once, however many categories it counts for) and pycocotools' ``segm`` evaluation
gives 12 more numbers, on annotations that have ``segmentation``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from gdino.inference.postprocess import to_pixels, top_k
from gdino.processing.classes import label_query
from gdino.processing.image import ImageError, read_annotated_image
from gdino.utils.progress import Progress, read_ahead

if TYPE_CHECKING:
    from gdino.inference.detector import GroundingDinoForObjectDetection

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

Found = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(N, 4) float (x0, y0, x1, y1) pixels, (N,) scores and (N,) int category indices (into the sorted categories)."""

Detector = Callable[[np.ndarray, dict[str, Any]], Found]
"""(H, W, 3) uint8 image and its COCO image entry -> what was found."""

Segment = Callable[[np.ndarray, np.ndarray], list[dict[str, Any]]]
"""(H, W, 3) uint8 image and (N, 4) x0 y0 x1 y1 pixel boxes -> each box's mask as COCO compressed RLE."""


class EvalError(ValueError):
    """The evaluation cannot run: a missing or malformed annotation file, or pycocotools missing."""


@dataclass(frozen=True)
class CocoEvaluation:
    """The outcome of ``evaluate_coco``.

    Attributes:
        metrics: the 12 numbers by name (``METRICS``); -1 where the dataset has no object of a size.
        table: pycocotools' 12 summary lines.
        results: the detections in the COCO results format (``image_id``, ``category_id``,
            ``bbox`` [x, y, w, h], ``score``).
        images: how many images were evaluated.
        failed: (file name, reason) of images that could not be read; they count as found nothing.
        per_category: category name -> {"AP": ..., "AP50": ...} (all areas, 100 detections); -1 where
            the evaluated images hold none of that category.
        mask_metrics: with a segmenter, the ``segm`` evaluation's 12 numbers by name; None without.
        mask_table: its 12 summary lines ("" without a segmenter). ``results`` then also hold each
            detection's ``segmentation`` (RLE).
    """

    metrics: dict[str, float]
    table: str
    results: list[dict[str, Any]]
    images: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    mask_metrics: dict[str, float] | None = None
    mask_table: str = ""


def _coco() -> Any:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise EvalError("gdino eval needs pycocotools: pip install 'gdino[eval]'") from None
    return COCO, COCOeval


class ModelDetector:
    """The original protocol with a model: all names prompted, the top ``max_dets`` (box, name) pairs.

    Attributes:
        chunks: the prompts (encoder and decoder passes) each image needs for the names.
    """

    def __init__(self, model: GroundingDinoForObjectDetection, names: Sequence[str], max_dets: int = 300) -> None:
        self.model, self.max_dets = model, max_dets
        self.query = label_query(names, model.processor.tokenizer)
        self.chunks = len(self.query.prompts)

    def __call__(self, image: np.ndarray, info: dict[str, Any]) -> Found:
        del info
        with torch.inference_mode():
            encoded = self.model.encode_image(image)  # the image side once, for every chunk
            found = top_k(self.model.score_label_chunks(encoded.features.crop(0), self.query.prompts), self.max_dets)
        height, width = image.shape[:2]
        return to_pixels(found.boxes, (width, height)), found.scores, found.ids


def model_detector(model: GroundingDinoForObjectDetection, names: Sequence[str], max_dets: int = 300) -> ModelDetector:
    """``ModelDetector(model, names, max_dets)``: the ``Detector`` ``gdino eval coco`` runs."""
    return ModelDetector(model, names, max_dets)


def read_image(path: Path, info: dict[str, Any]) -> np.ndarray:
    """The image as the annotations see it (``read_annotated_image``); ``info`` is its COCO record."""
    width, height = info.get("width"), info.get("height")
    return read_annotated_image(path, None if width is None or height is None else (int(width), int(height)))


def evaluate_coco(
    images: Path,
    annotations: Path,
    make_detector: Callable[[list[str]], Detector],
    max_dets: int = 300,
    limit: int | None = None,
    log: IO[str] | None = None,
    make_segmenter: Callable[[], Segment] | None = None,
) -> CocoEvaluation:
    """Runs ``detector`` on the annotated images and scores its detections with pycocotools.

    Args:
        images: the folder the annotations' ``file_name`` values are relative to.
        annotations: a COCO ``instances_*.json``.
        make_detector: makes the ``Detector`` from the category names (sorted by id), e.g.
            ``lambda names: model_detector(model, names)``.
        max_dets: the most detections kept per image (the best ones).
        limit: evaluate only the first ``limit`` images (by id).
        log: where progress and pycocotools' messages go (stderr when None).
        make_segmenter: makes the ``Segment`` function (called after ``make_detector``): the kept
            boxes are segmented and scored as ``segm`` too.

    Raises:
        EvalError: a segmenter given for annotations without ``segmentation``.
    """
    log = log if log is not None else sys.stderr
    COCO, COCOeval = _coco()
    truth = _read_annotations(annotations, COCO, log)
    categories = sorted(truth.loadCats(truth.getCatIds()), key=lambda c: c["id"])
    if not categories:
        raise EvalError(f"{annotations} has no categories")
    if make_segmenter is not None and not any(a.get("segmentation") for a in truth.dataset["annotations"]):
        raise EvalError(f"{annotations} has no segmentation to score masks against; leave out --masks")
    detector = make_detector([c["name"] for c in categories])
    segment = make_segmenter() if make_segmenter is not None else None
    category_ids = np.array([c["id"] for c in categories])
    image_ids = sorted(truth.getImgIds())[:limit]
    infos = truth.loadImgs(image_ids)
    results, failed = _detect_all(Path(images), infos, detector, category_ids, max_dets, log, segment)
    metrics, table, per_category = _score(truth, results, image_ids, COCO, COCOeval, log)
    evaluation = CocoEvaluation(metrics, table, results, len(image_ids), failed, per_category)
    if segment is None:
        return evaluation
    masks, mask_table, _ = _score(truth, results, image_ids, COCO, COCOeval, log, "segm")
    return replace(evaluation, mask_metrics=masks, mask_table=mask_table)


def _read_annotations(annotations: Path, COCO: Any, log: IO[str]) -> Any:
    """The annotation file as a ``pycocotools`` COCO object (its messages go to ``log``)."""
    if not Path(annotations).is_file():
        raise EvalError(f"annotation file not found: {annotations}")
    with contextlib.redirect_stdout(log):
        try:
            return COCO(str(annotations))
        except (ValueError, KeyError, TypeError) as e:
            raise EvalError(f"cannot read {annotations} as COCO annotations: {type(e).__name__}: {e}") from None


def _detect_all(
    images: Path,
    infos: list[dict[str, Any]],
    detector: Detector,
    category_ids: np.ndarray,
    max_dets: int,
    log: IO[str],
    segment: Segment | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every image's detections in the COCO results format (with ``segment``, each with its
    ``segmentation``), and the images that could not be used."""

    def load(info: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
        try:
            return read_image(images / info["file_name"], info), None
        except ImageError as e:
            return None, str(e)

    results: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    with Progress(len(infos), "eval", stream=log) as progress:
        for info, (image, error) in zip(infos, read_ahead(load, infos)):
            if image is not None:
                try:
                    results += _image_results(image, info, detector, category_ids, max_dets, segment)
                except Exception as e:  # noqa: BLE001 (one image must not end a long evaluation)
                    error = f"detection failed: {type(e).__name__}: {e}"
            if error is not None:
                failed.append((info["file_name"], error))
                print(f"eval: skipped {info['file_name']}: {error}", file=log, flush=True)
            progress.update()
    return results, failed


def _image_results(
    image: np.ndarray,
    info: dict[str, Any],
    detector: Detector,
    category_ids: np.ndarray,
    max_dets: int,
    segment: Segment | None,
) -> list[dict[str, Any]]:
    """One image's kept detections as COCO results; with ``segment``, each distinct box segmented once."""
    found = detector(image, info)
    results, order = _results(info["id"], found, category_ids, max_dets)
    if segment is not None and results:
        boxes = np.asarray(found[0], np.float32)[order]  # (K, 4), a box once per category it counts for
        distinct, which = np.unique(boxes, axis=0, return_inverse=True)
        rles = segment(image, distinct)
        for result, j in zip(results, which.reshape(-1)):
            result["segmentation"] = rles[int(j)]
    return results


def _results(
    image_id: int, found: Found, category_ids: np.ndarray, max_dets: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The ``max_dets`` best detections as COCO results, and their indices into ``found``."""
    boxes, scores, labels = (np.asarray(a) for a in found)
    order = np.argsort(-scores, kind="stable")[:max_dets]
    out = []
    for i in order:
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[int(labels[i])]),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(scores[i]), 6),
            }
        )
    return out, order


def _score(
    truth: Any,
    results: list[dict[str, Any]],
    image_ids: list[int],
    COCO: Any,
    COCOeval: Any,
    log: IO[str],
    kind: str = "bbox",
) -> tuple[dict[str, float], str, dict[str, dict[str, float]]]:
    """pycocotools' ``kind`` ("bbox" or "segm") evaluation over ``image_ids``: the 12 numbers, the
    summary table, AP by category."""
    with contextlib.redirect_stdout(log):
        if results:
            found = truth.loadRes([_for_loading(r, kind) for r in results])
        else:  # loadRes refuses an empty list; nothing found scores 0
            found = COCO()
            found.dataset = {
                "images": truth.dataset["images"],
                "categories": truth.dataset["categories"],
                "annotations": [],
            }
            found.createIndex()
        evaluation = COCOeval(truth, found, kind)
        evaluation.params.imgIds = image_ids
        evaluation.evaluate()
        evaluation.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluation.summarize()
    names = {c["id"]: c["name"] for c in truth.loadCats(evaluation.params.catIds)}
    precision = evaluation.eval["precision"]
    per_category = {names[c]: _category_ap(precision, k) for k, c in enumerate(evaluation.params.catIds)}
    return dict(zip(METRICS, (float(v) for v in evaluation.stats))), table.getvalue(), per_category


def _for_loading(result: dict[str, Any], kind: str) -> dict[str, Any]:
    """A copy of one result for ``loadRes`` (which adds keys): for "segm" without ``bbox``, so that
    pycocotools takes the area (small, medium, large) from the mask, not the box."""
    if kind == "bbox":
        return {k: v for k, v in result.items() if k != "segmentation"} | {"bbox": list(result["bbox"])}
    return {k: v for k, v in result.items() if k != "bbox"} | {"segmentation": dict(result["segmentation"])}


def _category_ap(precision: np.ndarray, k: int) -> dict[str, float]:
    """AP (IoU 0.50:0.95) and AP50 of category ``k`` from pycocotools' accumulated precision.

    ``precision`` is (T IoU thresholds, R recall points, K categories, A areas, M max-dets), -1 where
    undefined; area "all" is index 0 and 100 detections the last max-dets setting.
    """
    p = precision[:, :, k, 0, -1]  # (T, R)
    ap = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    p50 = p[0]
    ap50 = float(p50[p50 > -1].mean()) if (p50 > -1).any() else -1.0
    return {"AP": ap, "AP50": ap50}


def write_report(path: Path, evaluation: CocoEvaluation, **about: Any) -> None:
    """The 12 numbers (by name and as pycocotools' ``stats`` list) and what was evaluated, as JSON."""
    from gdino.utils.files import write_atomic

    report = {
        "metrics": evaluation.metrics,
        "stats": [evaluation.metrics[m] for m in METRICS],
        "per_category": evaluation.per_category,
        "images": evaluation.images,
        "detections": len(evaluation.results),
        "failed": [{"image": name, "error": reason} for name, reason in evaluation.failed],
        **about,
    }
    if evaluation.mask_metrics is not None:
        report["segm"] = {"metrics": evaluation.mask_metrics, "stats": [evaluation.mask_metrics[m] for m in METRICS]}
    write_atomic(path, json.dumps(report, indent=2) + "\n")
