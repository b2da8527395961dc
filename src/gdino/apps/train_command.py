"""``gdino train`` and ``gdino shapes``: thin command-line layers over ``gdino.training``.

``gdino train --data train.json --model IDEA-Research/grounding-dino-tiny --out runs/x`` fine-tunes;
``--model config:shapes`` (or ``config:tiny``) starts from a preset's architecture with random
weights. ``gdino shapes --out DIR`` writes the synthetic shapes data set (train, val, held_out).
Imports nothing heavy until a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gdino.apps.arguments import positive_int

EXIT_BAD_INPUT = 2


def add_arguments(commands: Any) -> None:
    """Adds ``train`` and ``shapes`` to ``gdino``'s subparsers."""
    train = commands.add_parser("train", help="fine-tune (or train from a preset) on COCO, ODVG or YOLO data")
    train.add_argument("--data", type=Path, required=True, help="COCO .json, ODVG .jsonl or YOLO folder")
    train.add_argument(
        "--images", type=Path, default=None, help="image folder of a COCO/ODVG file (default: its folder)"
    )
    train.add_argument(
        "--model",
        required=True,
        help="hub id, directory, checkpoint file, or config:shapes / config:tiny (random weights)",
    )
    train.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: epoch-N/ checkpoints, history.jsonl, train_settings.json; one that holds "
        "a run needs --resume or --overwrite",
    )
    train.add_argument("--val", type=Path, default=None, help="COCO .json to compute mAP on after each epoch")
    train.add_argument("--val-limit", type=positive_int, default=None, help="validate on the first N images only")
    train.add_argument("--epochs", type=positive_int, default=12)
    train.add_argument("--batch-size", type=positive_int, default=2)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument(
        "--lr-backbone",
        type=float,
        default=None,
        help="Swin's learning rate (default lr/10 fine-tuning, lr from a preset)",
    )
    train.add_argument("--lr-text", type=float, default=None, help="BERT's learning rate (default as --lr-backbone)")
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--schedule", choices=("step", "cosine"), default="step")
    train.add_argument("--warmup", type=int, default=0, metavar="STEPS", help="linear warm-up steps")
    train.add_argument("--clip", type=float, default=0.1, help="gradient norm clipping (0: none; default 0.1)")
    train.add_argument("--freeze", default="", help="comma list of parts to keep fixed: backbone,text")
    train.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (bf16/fp16 on GPU; bf16 on CPUs that have it natively)",
    )
    train.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        metavar="SHORT",
        help="short side of training images and of the saved processor (default: the model's)",
    )
    train.add_argument("--no-augment", action="store_true", help="only resize (no flip, multi-scale, crop)")
    train.add_argument("--max-labels", type=positive_int, default=80, help="labels in a caption (default 80)")
    train.add_argument(
        "--denoise",
        type=int,
        default=0,
        metavar="QUERIES",
        help="contrastive denoising queries per step (DINO: 100; default 0, off)",
    )
    train.add_argument(
        "--keep-classes",
        default=None,
        metavar="FILE|LIST",
        help="the base model's classes, not to forget (a file, one per line, or a comma list; default: the "
        "base checkpoint's classes.txt, which gdino train writes); for --replay and --distill",
    )
    train.add_argument(
        "--replay",
        action="store_true",
        help="pseudo-label replay: the base model labels the training images with --keep-classes and those "
        "boxes join the targets, so the old classes stay in the captions",
    )
    train.add_argument(
        "--replay-threshold", type=float, default=0.3, help="least score of a replayed box (default 0.3)"
    )
    train.add_argument(
        "--distill",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="distillation loss weight (default 0, off): the frozen base model's scores of --keep-classes "
        "and its boxes, on the same inputs",
    )
    train.add_argument(
        "--aux-loss",
        choices=("on", "off"),
        default=None,
        help="losses on every decoder layer (default: the model config's auxiliary_loss; "
        "the published config has it off, the original recipe on)",
    )
    train.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train only low-rank adapters of rank R on --lora-targets (default 0, off); checkpoints hold "
        "the merged weights, adapters.safetensors and lora_config.json beside them",
    )
    train.add_argument(
        "--lora-alpha", type=float, default=None, metavar="A", help="adapter scale A/R (default A = R: scale 1)"
    )
    train.add_argument(
        "--lora-targets",
        default="",
        metavar="PATTERNS",
        help="comma list of linear-layer name patterns to adapt, e.g. transformer.decoder,*.linear1 "
        "(default: the feature enhancer's and decoder's projections and feat_map; gdino.training.lora)",
    )
    train.add_argument("--save-every", type=int, default=0, metavar="STEPS", help="also write OUT/last every N steps")
    train.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps in all")
    train.add_argument("--max-minutes", type=float, default=None, help="stop (checkpoint, validate) after this long")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (refused if a setting that changes "
        "what is trained differs; a finished run is left as it is; no run there: start afresh)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a run, removing that run's checkpoints, history and "
        "settings first (never other files)",
    )
    train.add_argument(
        "--export-original",
        action="store_true",
        help="also write groundingdino.pth (the original repository's layout) each epoch",
    )

    shapes = commands.add_parser("shapes", help="write the synthetic shapes data set (COCO files)")
    shapes.add_argument("--out", type=Path, required=True)
    shapes.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    shapes.add_argument("--val", type=int, default=200, help="validation images, seen pairs (default 200)")
    shapes.add_argument("--held-out", type=int, default=200, help="images with held-out pairs (default 200)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--masks", action="store_true", help="also write each object's segmentation polygons (needs gdino[masks])"
    )


def settings_of(args: argparse.Namespace) -> Any:
    """The ``TrainSettings`` the arguments ask for."""
    from gdino.training.settings import TrainSettings

    return TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_backbone=args.lr_backbone,
        lr_text=args.lr_text,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_steps=args.warmup,
        clip_max_norm=args.clip,
        freeze=tuple(p.strip() for p in args.freeze.split(",") if p.strip()),
        dtype=None if args.dtype == "fp32" else args.dtype,
        device=args.device,
        seed=args.seed,
        image_size=args.image_size,
        augment=not args.no_augment,
        max_labels=args.max_labels,
        save_every=args.save_every,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes,
        export_original=args.export_original,
        val_limit=args.val_limit,
        denoise=args.denoise,
        keep_classes=_classes(args.keep_classes),
        replay=args.replay,
        replay_threshold=args.replay_threshold,
        distill=args.distill,
        aux_loss=None if args.aux_loss is None else args.aux_loss == "on",
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(p.strip() for p in args.lora_targets.split(",") if p.strip()),
    )


def _classes(value: str | None) -> tuple[str, ...]:
    """``--keep-classes``: a file of one class per line, or a comma list; empty when not given."""
    from gdino.apps.label import parse_classes

    return tuple(parse_classes(value)) if value else ()


def main(args: argparse.Namespace) -> int:
    """Runs ``train`` or ``shapes``; a bad setting, unusable data or a refused ``--out`` (it holds a
    run, without ``--resume`` or ``--overwrite``; ``--resume`` with other settings; a file in the
    way) is a one-line error, status 2."""
    from gdino.apps.label import LabelError
    from gdino.training.samples import DataError
    from gdino.training.settings import TrainError
    from gdino.training.trainer import train
    from gdino.utils.hub import CheckpointError

    try:
        if args.command == "shapes":
            return _shapes(args)
        data: Any = args.data
        if args.images is not None:
            from gdino.training.datasets import read_dataset

            data = read_dataset(args.data, args.images)
        result = train(
            data, args.model, args.out, settings_of(args), val=args.val, resume=args.resume, overwrite=args.overwrite
        )
    except (TrainError, DataError, CheckpointError, LabelError, FileNotFoundError) as e:
        print(f"gdino: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(f"train: last checkpoint {result.checkpoint}", file=sys.stderr, flush=True)
    return 0


def _shapes(args: argparse.Namespace) -> int:
    from gdino.training.shapes import write_shapes_dataset

    counts = {"train": args.train, "val": args.val, "held_out": args.held_out}
    chosen = {k: v for k, v in counts.items() if v}
    for split, path in write_shapes_dataset(args.out, chosen, args.seed, masks=args.masks).items():
        print(f"shapes: {split}: {path}", file=sys.stderr, flush=True)
    return 0
