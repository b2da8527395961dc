"""The runs of ``gdino label`` and ``gdino eval coco`` (their options are in ``gdino.apps.cli``).

    gdino label DIR --classes "cat,dog" --format coco|yolo|voc|jsonl --out OUT [--masks [MODEL]]
    gdino eval coco --images DIR --annotations instances.json [--out results.json] [--masks MODEL]

Bad input (no images, bad classes, a missing annotation file or model) gives a one-line error on
stderr and exit status 2. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    tile_options,
    tile_settings,
)
from gdino.apps.masking import load_masks_segmenter
from gdino.inference.tiled_masks import add_region_masks
from gdino.inference.tiles import TileSettings


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
    if problem := _masks_problem(args):
        return error(problem)
    try:
        classes = parse_classes(args.classes)
        if args.ray is None:  # with --ray the actors' machines have the device, not necessarily this one
            args.device = check_device(args.device)
        tiles = tile_settings(args)
        settings = Settings(
            tuple(classes),
            model_name(args),
            args.box_threshold,
            args.nms,
            masks=args.masks,
            tiles=tiles and tiles.describe(),
        )

        def make_detector() -> Any:
            model = load_detector(args)
            model.phrases(classes)  # checks the labels before any image is read
            tiled = tile_options(model, tiles, args.batch_size)
            segmenter = load_masks_segmenter(args, model)  # None without --masks

            def detect(images: list[Any]) -> list[Any]:
                found = model.detect(images, classes, args.box_threshold, nms_threshold=args.nms, **tiled)
                if segmenter is None:
                    return found
                return [add_region_masks(segmenter, i, f, tiles) for i, f in zip(images, found)]

            return detect

        runner = _ray_runner(args, classes, tiles) if args.ray is not None else None
        summary = label_folder(
            args.folder,
            args.out,
            args.format,
            settings,
            make_detector,
            args.batch_size,
            runner=runner,
            overwrite=args.overwrite,
            mask_format=args.mask_format or "polygon",
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


def _masks_problem(args: argparse.Namespace) -> str | None:
    """Why ``label``'s mask options cannot run, or None: checked before anything is read or written."""
    if args.mask_format is not None and args.masks is None:
        return "--mask-format says how to write masks: give it with --masks"
    if args.masks is not None and args.ray is not None:
        return "--masks does not run on Ray yet (the actors see resized images only); leave out --ray"
    missing = [p for p, m in (("pycocotools", "pycocotools"), ("opencv-python-headless", "cv2")) if not _has(m)]
    if args.masks is not None and missing:
        return f"--masks needs {' and '.join(missing)}: pip install 'gdino[masks]'"
    return None


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ray_runner(args: argparse.Namespace, classes: list[str], tiles: TileSettings | None) -> Any:
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
        tiles,
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
        tiles = tile_settings(args)
    except UsageError as e:
        return error(str(e))
    if args.masks is not None and not _has("pycocotools"):
        return error("--masks needs pycocotools: pip install 'gdino[masks]'")
    chunks = []
    models: list[Any] = []

    def make_detector(names: list[str]) -> Any:
        model = load_detector(args)
        models.append(model)
        tile_options(model, tiles, args.batch_size)  # an ONNX export cannot tile
        if tiles is not None:
            from gdino.evaluation.tiled import TiledModelDetector

            detector: Any = TiledModelDetector(model, names, tiles, args.max_dets, args.batch_size)
        else:
            detector = model_detector(model, names, args.max_dets)
        chunks.append(detector.chunks)
        print(f"eval: {len(names)} categories, {detector.chunks} prompt(s) per image", file=sys.stderr, flush=True)
        return detector

    def make_segmenter() -> Any:
        segmenter = load_masks_segmenter(args, models[-1])
        return lambda image, boxes: segmenter.segment(image, boxes)[0].to_rle()

    try:
        evaluation = evaluate_coco(
            args.images,
            args.annotations,
            make_detector,
            args.max_dets,
            args.limit,
            make_segmenter=make_segmenter if args.masks is not None else None,
        )
    except (EvalError, CheckpointError, PromptError, UsageError) as e:
        return error(str(e))
    if evaluation.mask_metrics is not None:
        print(f"bbox:\n{evaluation.table}segm:\n{evaluation.mask_table}", end="", flush=True)
    else:
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
            masks=args.masks,
        )
    if args.detections is not None:
        import json

        from gdino.utils.files import write_atomic

        write_atomic(args.detections, json.dumps(evaluation.results) + "\n")
    return 0
