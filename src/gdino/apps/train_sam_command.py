"""``gdino train-sam``: trains the shapes segmenter (a small SAM 2.1) from scratch, a thin layer over
``gdino.training.segmenter``.

``gdino train-sam --out DIR`` renders fresh shapes images as it goes (nothing to generate first),
writes the Hugging Face layout to ``DIR`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``, ``training.json``), then scores the mean mask IoU of ground-truth
box prompts on never-seen ``val`` and ``held_out`` images into ``DIR/metrics.json``. A ``DIR``
that already holds a model needs ``--overwrite``. Imports nothing heavy until the command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from gdino.apps.arguments import positive_float, positive_int

EXIT_BAD_INPUT = 2


def add_arguments(commands: Any) -> None:
    """Adds ``train-sam`` to ``gdino``'s subparsers."""
    sam = commands.add_parser("train-sam", help="train the shapes segmenter (a small SAM 2.1) from scratch")
    sam.add_argument("--out", type=Path, required=True, help="output folder (the model's files and metrics.json)")
    sam.add_argument("--steps", type=positive_int, default=2000, help="optimiser steps (default 2000)")
    sam.add_argument("--batch-size", type=positive_int, default=4, help="images a step (default 4)")
    sam.add_argument("--lr", type=positive_float, default=1.5e-3)
    sam.add_argument("--max-minutes", type=positive_float, default=None, help="stop training after this long")
    sam.add_argument("--seed", type=int, default=0)
    sam.add_argument(
        "--other-weight", type=float, default=0.0, help="extra cross-entropy weight on other objects' pixels"
    )
    sam.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    sam.add_argument(
        "--eval-images", type=int, default=100, help="never-seen images per split to score (default 100; 0: none)"
    )
    sam.add_argument("--overwrite", action="store_true", help="replace a model already in --out")


def main(args: argparse.Namespace) -> int:
    """Runs ``train-sam``; an --out that holds a model (without --overwrite) or is a file is a
    one-line error, status 2."""
    out: Path = args.out
    if out.exists() and not out.is_dir():
        print(f"gdino: error: --out {out} is a file, not a folder", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if (out / "model.safetensors").exists() and not args.overwrite:
        print(f"gdino: error: {out} already holds a model; give --overwrite to replace it", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    import torch

    from gdino.training.segmenter import SegmenterTrainSettings, save_segmenter, settings_record, train_segmenter
    from gdino.training.shapes import find_photos, load_photos

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = SegmenterTrainSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_minutes=args.max_minutes,
        other_weight=args.other_weight,
    )
    photos = load_photos(find_photos())
    start, cpu = time.monotonic(), time.process_time()
    model = train_segmenter(settings, photos=photos)
    seconds, cpu = time.monotonic() - start, time.process_time() - cpu
    record = settings_record(settings) | {
        "training_seconds": round(seconds, 1),
        "training_cpu_seconds": round(cpu, 1),
        "threads": torch.get_num_threads(),
    }
    save_segmenter(model, out, record)
    print(f"train-sam: trained in {seconds:.0f} s ({cpu:.0f} s of CPU); model in {out}", file=sys.stderr, flush=True)
    if args.eval_images > 0:
        _evaluate(model, out, args.eval_images, settings, photos)
    return 0


def _evaluate(model: Any, out: Path, count: int, settings: Any, photos: Any) -> None:
    from gdino.training.segmenter_data import split_scenes
    from gdino.training.segmenter_eval import scene_ious

    metrics: dict[str, Any] = {}
    for split in ("val", "held_out"):
        ious = scene_ious(model, split_scenes(split, 0, count, settings.seed, settings.shapes, photos))
        metrics[split] = {"images": count, "objects": len(ious), "mean_mask_iou": sum(ious) / max(len(ious), 1)}
        print(
            f"train-sam: {split}: mean mask IoU {metrics[split]['mean_mask_iou']:.3f} "
            f"({len(ious)} objects, ground-truth boxes as prompts)",
            file=sys.stderr,
            flush=True,
        )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
