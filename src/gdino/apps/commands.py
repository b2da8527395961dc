"""The runs of ``gdino label`` and ``gdino eval coco`` (their options are in ``gdino.apps.cli``).

    gdino label DIR --classes "cat,dog" --format coco|yolo|voc|jsonl --out OUT
    gdino eval coco --images DIR --annotations instances.json [--out results.json]

Bad input (no images, bad classes, a missing annotation file or model) gives a one-line error on
stderr and exit status 2. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gdino.apps.arguments import (
    UsageError,
    check_device,
    check_not_there,
    check_output_file,
    error,
    load_detector,
    model_name,
)


def main(args: argparse.Namespace) -> int:
    """Runs ``gdino label`` or ``gdino eval``; returns the exit status."""
    if args.command == "label":
        return run_label(args)
    return run_eval_coco(args)


def run_label(args: argparse.Namespace) -> int:
    from gdino.apps.label import LabelError, Settings, label_folder, parse_classes
    from gdino.processing.text import PromptError
    from gdino.utils.hub import CheckpointError

    if args.workers is not None and args.ray is None:
        return error("--workers is the number of Ray actors: give it with --ray")
    try:
        classes = parse_classes(args.classes)
        if args.ray is None:  # with --ray the actors' machines have the device, not necessarily this one
            args.device = check_device(args.device)
        settings = Settings(tuple(classes), model_name(args), args.box_threshold, args.nms)

        def make_detector() -> Any:
            model = load_detector(args)
            model.phrases(classes)  # checks the labels before any image is read
            return lambda images: model.detect(images, classes, args.box_threshold, nms_threshold=args.nms)

        runner = _ray_runner(args, classes) if args.ray is not None else None
        summary = label_folder(
            args.folder,
            args.out,
            args.format,
            settings,
            make_detector,
            args.batch_size,
            runner=runner,
            overwrite=args.overwrite,
        )
    except (LabelError, CheckpointError, PromptError, UsageError) as e:
        return error(str(e))
    except OSError as e:  # the export could not be written (e.g. the disk is full); the journal is kept
        return error(f"cannot write {e.filename or args.out}: {e.strerror or e}")
    errors = f"; {summary.errors} could not be read: see {args.out / 'errors.txt'}" if summary.errors else ""
    print(
        f"label: {summary.images} images, {summary.boxes} boxes, written to {args.out}{errors}",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _ray_runner(args: argparse.Namespace, classes: list[str]) -> Any:
    """``--ray``: detection on Ray, journal and exports here (``gdino.label_ray``)."""
    from gdino.apps.label_ray import RayOptions, image_settings, import_ray, ray_runner

    import_ray()  # a clear error before anything is written
    options = RayOptions(
        None if args.ray == "local" else args.ray,
        model_name(args),
        tuple(classes),
        args.box_threshold,
        args.nms,
        max(1, args.batch_size),
        args.workers,
        args.device,
        args.dtype,
        args.threads,
    )
    return ray_runner(options, image_settings(options.model))


def run_eval_coco(args: argparse.Namespace) -> int:
    from gdino.evaluation.coco import EvalError, evaluate_coco, model_detector, write_report
    from gdino.processing.text import PromptError
    from gdino.utils.hub import CheckpointError

    try:
        for path, option in ((args.out, "--out"), (args.detections, "--detections")):
            if path is not None:
                check_not_there(path, option, args.overwrite)
                check_output_file(path, option)
        args.device = check_device(args.device)
    except UsageError as e:
        return error(str(e))
    chunks = []

    def make_detector(names: list[str]) -> Any:
        detector = model_detector(load_detector(args), names, args.max_dets)
        chunks.append(detector.chunks)
        print(f"eval: {len(names)} categories, {detector.chunks} prompt(s) per image", file=sys.stderr, flush=True)
        return detector

    try:
        evaluation = evaluate_coco(args.images, args.annotations, make_detector, args.max_dets, args.limit)
    except (EvalError, CheckpointError, PromptError) as e:
        return error(str(e))
    print(evaluation.table, end="", flush=True)
    if evaluation.failed:
        print(
            f"eval: {len(evaluation.failed)} images could not be read and count as found nothing",
            file=sys.stderr,
            flush=True,
        )
    if args.out is not None:
        write_report(
            args.out,
            evaluation,
            model=model_name(args),
            annotations=str(args.annotations),
            max_dets=args.max_dets,
            prompts_per_image=chunks[0] if chunks else 0,
        )
    if args.detections is not None:
        import json

        from gdino.utils.files import write_atomic

        write_atomic(args.detections, json.dumps(evaluation.results) + "\n")
    return 0
