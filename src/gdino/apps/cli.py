"""Command line: ``gdino detect IMAGE... --prompt TEXT``.

Output is one JSON object per image, a line each (JSON Lines), on stdout or in ``--output``.
Bad input (an unreadable or unusable image, an empty or over-long prompt, a missing model, a
device that is not there, an output that cannot be written or would overwrite an input) gives a
one-line error on stderr and exit status 2; the other images are still processed and written.
Everything that can be checked without the images is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from gdino.apps.arguments import (
    EXIT_BAD_INPUT,
    UsageError,
    add_model_arguments,
    add_overwrite_argument,
    add_threads_argument,
    add_tile_arguments,
    check_device,
    check_not_there,
    check_output_file,
    check_output_folder,
    error,
    fraction,
    load_detector,
    positive_int,
    tile_options,
    tile_settings,
)
from gdino.apps.exports import FORMATS  # standard library only
from gdino.apps.masking import add_masks_argument, load_export_segmenter, load_masks_segmenter
from gdino.apps.merge_command import add_arguments as add_merge_arguments
from gdino.apps.server import (
    add_arguments as add_serve_arguments,  # standard library only; FastAPI is imported by serve
)
from gdino.apps.track import add_arguments as add_track_arguments
from gdino.apps.train_command import add_arguments as add_train_arguments
from gdino.apps.train_sam_command import add_arguments as add_train_sam_arguments

if TYPE_CHECKING:
    from gdino.processing.prompts import TextInput

DRAWN_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _parser() -> argparse.ArgumentParser:
    """``gdino``'s one parser: detect, label, eval, serve, train, shapes and export, the model options
    defined once."""
    parser = argparse.ArgumentParser(prog="gdino", description="Zero-shot object detection with Grounding DINO.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_detect(commands.add_parser("detect", help="detect the prompt's phrases in images"))
    _add_label(commands.add_parser("label", help="pre-label a folder of images (COCO, YOLO, VOC or JSON Lines)"))
    evaluate = commands.add_parser("eval", help="zero-shot evaluation on a labelled dataset")
    datasets = evaluate.add_subparsers(dest="dataset", required=True)
    coco = datasets.add_parser("coco", help="COCO-format dataset: the original repository's zero-shot protocol")
    _add_eval_coco(coco)
    serve = commands.add_parser("serve", help="an HTTP API and a page to try prompts (gdino[serve])")
    add_serve_arguments(serve)
    add_train_arguments(commands)
    add_track_arguments(commands)
    add_train_sam_arguments(commands)
    add_merge_arguments(commands)
    _add_export_arguments(commands.add_parser("export", help="export the model for other runtimes (gdino[onnx])"))
    models = commands.add_parser("models", help="the published checkpoints of the family, to give as --model")
    models.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")
    return parser


def _add_detect(detect: argparse.ArgumentParser) -> None:
    detect.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    detect.add_argument("--prompt", required=True, help='"a cat. a remote control." or labels "cat,remote control"')
    detect.add_argument(
        "--box-threshold", type=fraction, default=None, help="0 to 1 (default: the model's; 0.35 for the published)"
    )
    detect.add_argument(
        "--text-threshold", type=fraction, default=None, help="0 to 1 (default: the model's; 0.25 for the published)"
    )
    detect.add_argument(
        "--nms",
        type=fraction,
        default=None,
        metavar="IOU",
        help="drop a box overlapping a better box of its label by more than this IoU (0 to 1)",
    )
    detect.add_argument(
        "--batch-size", type=positive_int, default=1, help="images (with --tile: tiles) per forward pass (default 1)"
    )
    add_tile_arguments(detect)
    detect.add_argument("--output", type=Path, help="write JSON Lines here instead of stdout")
    detect.add_argument(
        "--annotate", type=Path, metavar="DIR", help="write the images with boxes (and masks) drawn here"
    )
    add_masks_argument(detect, "add each detection's mask, COCO RLE")
    add_overwrite_argument(detect, "--output and --annotate files")
    add_model_arguments(detect)
    add_threads_argument(detect)


def _add_label(label: argparse.ArgumentParser) -> None:
    label.add_argument("folder", type=Path, metavar="DIR", help="folder of images, searched recursively")
    label.add_argument("--classes", required=True, help='"cat,dog", or a file with one class a line')
    label.add_argument("--format", choices=FORMATS, default="coco")
    label.add_argument("--out", type=Path, required=True, help="output folder (started again, it resumes)")
    label.add_argument(
        "--box-threshold",
        type=fraction,
        default=None,
        help="keep boxes whose class scores above this, 0 to 1 (default: the model's; 0.35 for the published)",
    )
    label.add_argument(
        "--nms",
        type=fraction,
        default=None,
        metavar="IOU",
        help="drop a box overlapping a better box of its class by more than this IoU (0 to 1)",
    )
    label.add_argument(
        "--batch-size", type=positive_int, default=4, help="images (with --tile: tiles) per call (default 4)"
    )
    add_tile_arguments(label)
    add_overwrite_argument(label, "files in --out that an earlier gdino label did not write")
    label.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS|auto",
        help="run on Ray (pip install 'gdino[ray]'): alone a local instance, 'auto' the running "
        "cluster, or the cluster at ADDRESS",
    )
    label.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="with --ray: model actors (default: one per GPU, else one per two CPUs)",
    )
    add_masks_argument(label, "segment each detection, kept in every format")
    label.add_argument(
        "--mask-format",
        choices=("polygon", "rle"),
        default=None,
        help="with --masks: COCO segmentation as polygons (default) or RLE",
    )
    add_model_arguments(label)
    add_threads_argument(label)


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="text, image and detection graphs for onnxruntime (gdino.runtime.onnx)")
    onnx.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    onnx.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the export to")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: Swin, BERT and the feature enhancer in half precision, for GPU providers",
    )
    onnx.add_argument("--quantize", choices=("int8",), default=None, help="dynamic int8 quantisation of the weights")
    add_masks_argument(onnx, "also export this segmenter's image-encoder and mask-decoder graphs, for detect --masks")
    add_overwrite_argument(onnx, "the files of a non-empty --out")


def export(args: argparse.Namespace) -> int:
    """Runs ``gdino export onnx``: writes the graphs and their settings into ``--out``."""
    from gdino.export.onnx import QUANTIZE_FP16, export_onnx
    from gdino.inference.detector import GroundingDinoForObjectDetection
    from gdino.utils.hub import DEFAULT_MODEL_ID, CheckpointError

    if args.dtype == "fp16" and args.quantize:  # refused before the model loads and minutes of tracing
        return error(QUANTIZE_FP16)
    if args.out.is_file() or (args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite):
        what = "is a file" if args.out.is_file() else "is not empty"
        return error(f"--out {args.out} {what}; an export goes into a new or empty folder (or give --overwrite)")
    try:
        segmenter = load_export_segmenter(args.masks)  # loaded first: a bad name is refused before minutes of tracing
        model = GroundingDinoForObjectDetection.from_pretrained(args.model or DEFAULT_MODEL_ID, device="cpu")
    except (CheckpointError, UsageError) as e:
        return error(str(e))
    settings = export_onnx(model, args.out, opset=args.opset, dtype=args.dtype, quantize=args.quantize)
    if segmenter is not None:
        from gdino.export.onnx_masks import export_segmenter_onnx

        settings["export_seconds"] += export_segmenter_onnx(segmenter, args.out, opset=args.opset)["export_seconds"]
        settings["file_sizes"] = {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()}
    print(json.dumps({"out": str(args.out), "seconds": settings["export_seconds"], "files": settings["file_sizes"]}))
    return 0


def list_models(as_json: bool) -> int:
    """``gdino models``: the known checkpoints, their size, licence, published figures and checks."""
    from gdino.checkpoint.catalog import KNOWN_MODELS

    rows: list[dict[str, Any]] = [
        {
            "model": m.name,
            "family": m.family,
            "backbone": m.backbone,
            "parameters_m": round(m.parameters() / 1e6, 1),
            "licence": m.licence,
            "published": m.figures or "see its model card",
            "checked_against": m.checked,
        }
        for m in KNOWN_MODELS
    ]
    if as_json:
        print("".join(json.dumps(row) + "\n" for row in rows), end="")
        return 0
    width = max(len(r["model"]) for r in rows)
    for r in rows:
        print(
            f"{r['model']:<{width}}  {r['backbone']:<6}  {r['parameters_m']:>6.1f}M  {r['licence']}  {r['published']}"
        )
    print(
        "\nAny of these is a --model (downloaded once, then read from the hub cache); "
        "`gdino models --json` adds what each was checked against."
    )
    return 0


def _add_eval_coco(coco: argparse.ArgumentParser) -> None:
    coco.add_argument("--images", type=Path, required=True, help="folder the annotations' file names are in")
    coco.add_argument("--annotations", type=Path, required=True, help="instances_*.json")
    coco.add_argument("--out", type=Path, default=None, help="write the 12 numbers here as JSON")
    coco.add_argument("--detections", type=Path, default=None, help="write the detections here (COCO results)")
    coco.add_argument("--max-dets", type=positive_int, default=300, help="detections kept per image (default 300)")
    coco.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    coco.add_argument("--batch-size", type=positive_int, default=4, help="with --tile: tiles per pass (default 4)")
    add_tile_arguments(coco)
    add_overwrite_argument(coco, "--out and --detections files")
    add_masks_argument(coco, "segment the detections and also report the segm summary")
    add_model_arguments(coco)
    add_threads_argument(coco)


# --------------------------------------------------------------------------- where the outputs go


def annotated_paths(images: Sequence[str], folder: Path) -> list[Path]:
    """The file each image is drawn into: its name in ``folder`` (.png unless a drawable suffix),
    ``name-2``, ``name-3``... for images of the same name (a/img.png and b/img.png)."""
    taken: set[Path] = set()
    targets = []
    for image in images:
        target = folder / Path(image).name
        if target.suffix.lower() not in DRAWN_SUFFIXES:
            target = target.with_suffix(".png")
        stem, n = target.stem, 1
        while target in taken:
            n += 1
            target = target.with_name(f"{stem}-{n}{target.suffix}")
        taken.add(target)
        targets.append(target)
    return targets


def check_outputs(
    images: Sequence[str], output: Path | None, annotate: Path | None, overwrite: bool = False
) -> list[Path] | None:
    """Refuses (``UsageError``) outputs that would overwrite an input image or cannot be written,
    and, unless ``overwrite``, any output file that is already there.

    Returns the annotated file of each image (None without ``annotate``). Compares files, not
    names: a symbolic link, a relative path or a hard link to an input counts as the input.
    """
    inputs = _file_ids(Path(image) for image in images)
    targets = annotated_paths(images, annotate) if annotate is not None else None
    if output is not None:
        if _file_id(output) in inputs:
            raise UsageError(f"--output {output} is one of the input images; it would be overwritten")
        if targets is not None and any(output.resolve() == t.resolve() for t in targets):
            raise UsageError(f"--output {output} is also where --annotate draws an image; choose another file")
    if targets is not None and annotate is not None:
        clashes = [(t, images[i]) for i, t in enumerate(targets) if _file_id(t) in inputs]
        if clashes:
            more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
            raise UsageError(
                f"--annotate {annotate} would write {clashes[0][0]} over the input image "
                f"{clashes[0][1]}{more}; choose another folder"
            )
        there = [t for t in targets if t.exists() or t.is_symlink()]
        if there and not overwrite:
            more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
            raise UsageError(
                f"--annotate {annotate} already holds {there[0].name}{more}; give --overwrite to replace "
                "annotated images, or another folder"
            )
        check_output_folder(annotate, "--annotate")
    if output is not None:
        check_not_there(output, "--output", overwrite)
        check_output_file(output, "--output")
    return targets


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file, through links; None when there is none."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_dev, stat.st_ino


def _file_ids(paths: Iterable[Path]) -> set[tuple[int, int]]:
    return {key for key in map(_file_id, paths) if key is not None}


@contextmanager
def _sink(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yield f


# --------------------------------------------------------------------------- the run


def _batches(items: Sequence[str], size: int) -> Iterator[list[int]]:
    """Indices of ``items`` in batches of ``size``."""
    for start in range(0, len(items), size):
        yield list(range(start, min(start + size, len(items))))


def detect(args: argparse.Namespace) -> int:
    """Runs ``gdino detect``; returns the exit status (2 when anything given could not be used)."""
    try:
        targets = check_outputs(args.images, args.output, args.annotate, args.overwrite)
        args.tiles = tile_settings(args)
        args.device = check_device(args.device)
    except UsageError as e:
        return error(str(e))
    from gdino.processing.prompts import prompt_from_text
    from gdino.processing.text import PromptError
    from gdino.utils.hub import CheckpointError

    prompt = prompt_from_text(args.prompt)
    try:
        model = load_detector(args)
        model.phrases(prompt)  # validates the prompt (length, at least one phrase) before any image is read
        tile_options(model, args.tiles, args.batch_size)  # an ONNX export cannot tile
        segmenter = load_masks_segmenter(args, model)  # loaded once, None without --masks
    except (CheckpointError, PromptError, UsageError) as e:
        return error(str(e))
    status = 0
    with _sink(args.output) as out:
        for batch in _batches(args.images, args.batch_size):
            for i, image, found in _detect_batch(model, batch, prompt, args):
                path = args.images[i]
                if segmenter is not None and not isinstance(found, str):
                    found = _add_masks(segmenter, image, found, path, args.tiles)
                if isinstance(found, str):
                    status = error(found)
                    continue
                record = {"image": path, "width": image.width, "height": image.height, "detections": found.to_list()}
                out.write(json.dumps(record) + "\n")
                out.flush()
                if targets is not None and not _annotate(image, found, targets[i]):
                    status = EXIT_BAD_INPUT
    return status


def _detect_batch(
    model: Any, indices: list[int], prompt: TextInput, args: argparse.Namespace
) -> list[tuple[int, Any, Any]]:
    """(index, image, Detections) per image of the batch, or (index, None, error message) for an
    image that cannot be read or that the model refuses (e.g. too elongated to resize)."""
    from gdino.processing.image import ImageError, load_image

    results: list[tuple[int, Any, Any]] = []
    loaded = []
    for i in indices:
        try:
            loaded.append((i, load_image(args.images[i])))
        except ImageError as e:
            results.append((i, None, str(e)))
    results += _run_model(model, loaded, prompt, args)
    return sorted(results, key=lambda r: r[0])


def _run_model(
    model: Any, loaded: list[tuple[int, Any]], prompt: TextInput, args: argparse.Namespace
) -> list[tuple[int, Any, Any]]:
    """Detects a batch of loaded images; if the model refuses it, image by image, the refused reported."""
    if not loaded:
        return []
    try:
        found = model.detect(
            [image for _, image in loaded],
            prompt,
            args.box_threshold,
            args.text_threshold,
            nms_threshold=args.nms,
            **tile_options(model, args.tiles, args.batch_size),
        )
    except ValueError as e:  # ImageError and the like: this input cannot be used, the others can
        if len(loaded) > 1:
            return [r for item in loaded for r in _run_model(model, [item], prompt, args)]
        i, _ = loaded[0]
        return [(i, None, f"{args.images[i]}: {e}")]
    return [(i, image, f) for (i, image), f in zip(loaded, found)]


def _add_masks(segmenter: Any, image: Any, found: Any, path: str, tiles: Any) -> Any:
    """``found`` with each detection's mask (with ``tiles``, on the tile crops that hold the boxes), or the
    error message for an image the segmenter refuses."""
    from gdino.inference.tiled_masks import add_region_masks

    try:
        return add_region_masks(segmenter, image, found, tiles)
    except ValueError as e:
        return f"{path}: masks: {e}"


def _annotate(image: Any, found: Any, target: Path) -> bool:
    """Draws the detections into ``target``; False (and one error line) if it cannot be written."""
    from gdino.apps.draw import draw_detections

    try:
        draw_detections(image, found).save(target)
    except OSError as e:
        error(f"cannot write {target}: {e.strerror or e}")
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from gdino.apps.server import main as serve

        return serve(args)
    if args.command in ("label", "eval"):
        from gdino.apps.commands import main as run_task

        return run_task(args)
    if args.command == "track":
        from gdino.apps.track import main as run_track

        return run_track(args)
    if args.command in ("train", "shapes"):
        from gdino.apps.train_command import main as run_training

        return run_training(args)
    if args.command == "merge":
        from gdino.apps.merge_command import main as run_merge

        return run_merge(args)
    if args.command == "train-sam":
        from gdino.apps.train_sam_command import main as run_sam_training

        return run_sam_training(args)
    if args.command == "export":
        return export(args)
    if args.command == "models":
        return list_models(args.json)
    from gdino.inference.detector import on_chunk
    from gdino.utils.progress import ChunkProgress

    with on_chunk(ChunkProgress()):  # a long label list runs in passes: show them on stderr
        return detect(args)


if __name__ == "__main__":
    sys.exit(main())
