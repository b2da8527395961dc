"""Tiled detection side by side on one large canvas and one checkpoint: SAHI with transformers' model,
SAHI with gdino's ``GdinoDetectionModel``, and gdino's own tiling (``detect(..., tiles=...)``).

    python bench/tiles.py --threads 2                                # 3000x2000 canvas, gdino-shapes, 192 px tiles
    python bench/tiles.py --threads 2 --size 800x600 --repeat 1      # the smallest run, to check that it works
    python bench/tiles.py --size 6000x4000 --device cuda

The canvas is ``gdino.training.canvases.render_canvas`` (small coloured shapes among clutter, with
their boxes), so each way's AP50 is printed beside its time. All three run the same slices (SAHI's
grid equals ours when ``overlap * tile`` is whole), the whole image too, and merge by greedy NMM on
IoS 0.5; SAHI runs ``--batch-size`` slices per call as ours does. transformers' zero-shot path
scores a label by its best token (a phrase prompt), gdino's by the mean of its tokens (a label
list), so their boxes differ slightly; the times compare the same work. Needs the test extra
(transformers, sahi, pycocotools).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gdino import GroundingDinoForObjectDetection
from gdino.inference.tiles import TileSettings, tile_grid
from gdino.integrations.sahi import GdinoDetectionModel
from gdino.training.canvases import CanvasSettings, render_canvas
from gdino.training.shapes import pair_names
from gdino.utils.hub import resolve

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]  # (N, 4) xyxy boxes, (N,) scores, (N,) label indices


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gdino-shapes", help="a checkpoint in the Hugging Face layout")
    parser.add_argument("--size", default="3000x2000", help="canvas WIDTHxHEIGHT (default 3000x2000)")
    parser.add_argument("--shapes", type=int, default=None, help="shapes on the canvas (default: 25 per megapixel)")
    parser.add_argument("--tile", type=int, default=192)
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.25, help="box (confidence) threshold")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per model call, for all three")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each way (the median is kept)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def canvas(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    shapes = args.shapes or max(10, round(25 * width * height / 1e6))
    scene = render_canvas(np.random.default_rng(args.seed), CanvasSettings(size=(width, height), shapes=shapes))
    return scene.image, scene.boxes, np.asarray(scene.pairs)


def sahi_rows(result: Any, names: list[str]) -> Rows:
    found = result.object_prediction_list
    boxes = np.array([p.bbox.to_xyxy() for p in found], np.float32).reshape(-1, 4)
    index = {name: i for i, name in enumerate(names)}
    return boxes, np.array([p.score.value for p in found]), np.array([index.get(p.category.name, -1) for p in found])


def ap50(truth: tuple[np.ndarray, np.ndarray], rows: Rows, size: tuple[int, int]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b: np.ndarray) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": size[0], "height": size[1]}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": int(p) + 1, "bbox": xywh(b), "iscrowd": 0}
            | {"area": float((b[2] - b[0]) * (b[3] - b[1]))}
            for i, (b, p) in enumerate(zip(*truth))
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(pair_names())],
    }
    boxes, scores, ids = rows
    keep = ids >= 0
    if not keep.any():
        return 0.0
    results = [
        {"image_id": 1, "category_id": int(i) + 1, "bbox": xywh(b), "score": float(s)}
        for b, s, i in zip(boxes[keep], scores[keep], ids[keep])
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])


def ways(args: argparse.Namespace, image: np.ndarray, names: list[str]) -> dict[str, Callable[[], Rows]]:
    """The three ways, each a function running it once on the canvas."""
    from sahi.models.huggingface import HuggingfaceDetectionModel
    from sahi.predict import get_sliced_prediction
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    directory = resolve(args.model).directory
    if directory is None:
        raise SystemExit("bench/tiles.py: --model must be in the Hugging Face layout (transformers loads it too)")
    path = str(directory)
    ours = GroundingDinoForObjectDetection.from_pretrained(path, device=args.device).eval()
    hf = AutoModelForZeroShotObjectDetection.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    hf_model = HuggingfaceDetectionModel(
        model=hf,
        processor=AutoProcessor.from_pretrained(path),
        device=args.device,
        confidence_threshold=args.threshold,
        text_labels=names,
        text_threshold=0.25,  # 0 would join every token of the prompt into one label, which SAHI drops
    )
    gdino_model = GdinoDetectionModel(model=ours, labels=names, confidence_threshold=args.threshold)
    sliced = {
        "slice_height": args.tile,
        "slice_width": args.tile,
        "overlap_height_ratio": args.overlap,
        "overlap_width_ratio": args.overlap,
        "postprocess_type": "GREEDYNMM",
        "postprocess_match_metric": "IOS",
        "postprocess_match_threshold": 0.5,
        "postprocess_class_agnostic": False,
        "batch_size": args.batch_size,
        "verbose": 0,
    }
    tiles = TileSettings(args.tile, args.overlap)
    picture = Image.fromarray(image)

    def own() -> Rows:
        found = ours.detect(picture, names, args.threshold, tiles=tiles, batch_size=args.batch_size)
        return found.boxes, found.scores, found.label_ids

    return {
        "sahi + transformers": lambda: sahi_rows(get_sliced_prediction(image, hf_model, **sliced), names),
        "sahi + gdino": lambda: sahi_rows(get_sliced_prediction(image, gdino_model, **sliced), names),
        "gdino tiles": own,
    }


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    image, boxes, pairs = canvas(args)
    size = (image.shape[1], image.shape[0])
    n_tiles = len(tile_grid(*size, TileSettings(args.tile, args.overlap)))
    print(f"canvas {size[0]}x{size[1]}, {len(boxes)} shapes; {n_tiles} tiles of {args.tile} px (+ the whole image)")
    figures: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        runs = ways(args, image, pair_names())
        found = {name: run() for name, run in runs.items()}  # warm-up: first-call allocations and caches
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):  # the ways in turns (A B C A B C), so that all see the same machine
            for name, run in runs.items():
                start = time.perf_counter()
                found[name] = run()
                times[name].append(time.perf_counter() - start)
    for name, rows in found.items():
        row = {
            "seconds": statistics.median(times[name]),
            "boxes": len(rows[0]),
            "ap50": ap50((boxes, pairs), rows, size),
        }
        figures[name] = row
        print(f"{name:<20} {row['seconds']:8.2f} s  {row['boxes']:5d} boxes  AP50 {row['ap50']:.3f}")
    base = figures["gdino tiles"]["seconds"]
    for name, row in figures.items():
        print(f"{name:<20} {row['seconds'] / base:6.2f}x the time of gdino's own tiling")
    if args.json is not None:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"settings": settings, "tiles": n_tiles, "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
