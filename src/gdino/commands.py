"""``gdino label`` and ``gdino eval coco``: argument parsing (standard library only) and the runs.

    gdino label DIR --classes "cat,dog" --format coco|yolo|voc|jsonl --out OUT
    gdino eval coco --images DIR --annotations instances.json [--out results.json]

Bad input (no images, bad classes, a missing annotation file or model) gives a one-line error on
stderr and exit status 2. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .arguments import UsageError, check_device, check_output_file, fraction, positive_int  # standard library only
from .exports import FORMATS  # standard library only

EXIT_BAD_INPUT = 2


def add_arguments(commands: Any) -> None:
    """Adds the ``label`` and ``eval`` subcommands to ``gdino``'s subparsers."""
    label = commands.add_parser("label", help="pre-label a folder of images (COCO, YOLO, VOC or JSON Lines)")
    label.add_argument("folder", type=Path, metavar="DIR", help="folder of images, searched recursively")
    label.add_argument("--classes", required=True, help='"cat,dog", or a file with one class a line')
    label.add_argument("--format", choices=FORMATS, default="coco")
    label.add_argument("--out", type=Path, required=True, help="output folder (started again, it resumes)")
    label.add_argument("--box-threshold", type=fraction, default=0.35,
                       help="keep boxes whose class scores above this, 0 to 1 (default 0.35)")
    label.add_argument("--nms", type=fraction, default=None, metavar="IOU",
                       help="drop a box overlapping a better box of its class by more than this IoU (0 to 1)")
    label.add_argument("--batch-size", type=positive_int, default=4, help="images per call (default 4)")
    label.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS|auto",
                       help="run on Ray (pip install 'gdino[ray]'): alone a local instance, 'auto' the running "
                            "cluster, or the cluster at ADDRESS")
    label.add_argument("--workers", type=positive_int, default=None,
                       help="with --ray: model actors (default: one per GPU, else one per two CPUs)")
    _model_arguments(label)

    evaluate = commands.add_parser("eval", help="zero-shot evaluation on a labelled dataset")
    datasets = evaluate.add_subparsers(dest="dataset", required=True)
    coco = datasets.add_parser("coco", help="COCO-format dataset: the original repository's zero-shot protocol")
    coco.add_argument("--images", type=Path, required=True, help="folder the annotations' file names are in")
    coco.add_argument("--annotations", type=Path, required=True, help="instances_*.json")
    coco.add_argument("--out", type=Path, default=None, help="write the 12 numbers here as JSON")
    coco.add_argument("--detections", type=Path, default=None, help="write the detections here (COCO results)")
    coco.add_argument("--max-dets", type=positive_int, default=300, help="detections kept per image (default 300)")
    coco.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    _model_arguments(coco)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")


def _error(message: str) -> int:
    print(f"gdino: error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def _load_model(args: argparse.Namespace) -> Any:
    from .cli import load_detector  # the onnxruntime detector when --model is an ONNX export

    return load_detector(_model_name(args), args.device, args.dtype)


def _model_name(args: argparse.Namespace) -> str:
    from .weights import DEFAULT_MODEL_ID

    return str(args.model or DEFAULT_MODEL_ID)


def main(args: argparse.Namespace) -> int:
    """Runs ``gdino label`` or ``gdino eval``; returns the exit status."""
    if args.command == "label":
        return _label(args)
    return _eval_coco(args)


def _label(args: argparse.Namespace) -> int:
    from . import CheckpointError, PromptError
    from .label import LabelError, Settings, label_folder, parse_classes

    if args.workers is not None and args.ray is None:
        return _error("--workers is the number of Ray actors: give it with --ray")
    try:
        classes = parse_classes(args.classes)
        if args.ray is None:  # with --ray the actors' machines have the device, not necessarily this one
            args.device = check_device(args.device)
        settings = Settings(tuple(classes), _model_name(args), args.box_threshold, args.nms)

        def make_detector() -> Any:
            model = _load_model(args)
            model.phrases(classes)  # checks the labels before any image is read
            return lambda images: model.detect(images, classes, args.box_threshold, nms_threshold=args.nms)

        runner = _ray_runner(args, classes) if args.ray is not None else None
        summary = label_folder(args.folder, args.out, args.format, settings, make_detector, args.batch_size,
                               runner=runner)
    except (LabelError, CheckpointError, PromptError, UsageError) as e:
        return _error(str(e))
    except OSError as e:  # the export could not be written (e.g. the disk is full); the journal is kept
        return _error(f"cannot write {e.filename or args.out}: {e.strerror or e}")
    errors = f"; {summary.errors} could not be read: see {args.out / 'errors.txt'}" if summary.errors else ""
    print(f"label: {summary.images} images, {summary.boxes} boxes, written to {args.out}{errors}",
          file=sys.stderr, flush=True)
    return 0


def _ray_runner(args: argparse.Namespace, classes: list[str]) -> Any:
    """``--ray``: detection on Ray, journal and exports here (``gdino.label_ray``)."""
    from .label_ray import RayOptions, image_settings, import_ray, ray_runner

    import_ray()  # a clear error before anything is written
    options = RayOptions(None if args.ray == "local" else args.ray, _model_name(args), tuple(classes),
                         args.box_threshold, args.nms, max(1, args.batch_size), args.workers, args.device, args.dtype)
    return ray_runner(options, image_settings(options.model))


def _eval_coco(args: argparse.Namespace) -> int:
    from . import CheckpointError, PromptError
    from .evaluate import EvalError, evaluate_coco, model_detector, write_report

    try:
        for path, option in ((args.out, "--out"), (args.detections, "--detections")):
            if path is not None:
                check_output_file(path, option)
        args.device = check_device(args.device)
    except UsageError as e:
        return _error(str(e))
    chunks = []

    def make_detector(names: list[str]) -> Any:
        detector = model_detector(_load_model(args), names, args.max_dets)
        chunks.append(detector.chunks)
        print(f"eval: {len(names)} categories, {detector.chunks} prompt(s) per image", file=sys.stderr, flush=True)
        return detector

    try:
        evaluation = evaluate_coco(args.images, args.annotations, make_detector, args.max_dets, args.limit)
    except (EvalError, CheckpointError, PromptError) as e:
        return _error(str(e))
    print(evaluation.table, end="", flush=True)
    if evaluation.failed:
        print(f"eval: {len(evaluation.failed)} images could not be read and count as found nothing",
              file=sys.stderr, flush=True)
    if args.out is not None:
        write_report(args.out, evaluation, model=_model_name(args), annotations=str(args.annotations),
                     max_dets=args.max_dets, prompts_per_image=chunks[0] if chunks else 0)
    if args.detections is not None:
        import json

        from .exports import write_atomic

        write_atomic(args.detections, json.dumps(evaluation.results) + "\n")
    return 0
