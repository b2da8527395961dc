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
from typing import IO, Any

from .arguments import UsageError, check_device, check_output_file, check_output_folder, fraction, positive_int
from .commands import add_arguments as add_task_arguments  # label, eval; standard library only
from .server import add_arguments as add_serve_arguments  # standard library only; FastAPI is imported by serve
from .train_command import add_arguments as add_train_arguments

EXIT_BAD_INPUT = 2
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DRAWN_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdino", description="Zero-shot object detection with Grounding DINO.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="detect the prompt's phrases in images")
    detect.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    detect.add_argument("--prompt", required=True, help='"a cat. a remote control." or labels "cat,remote control"')
    detect.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    detect.add_argument("--box-threshold", type=fraction, default=0.35, help="0 to 1 (default 0.35)")
    detect.add_argument("--text-threshold", type=fraction, default=0.25, help="0 to 1 (default 0.25)")
    detect.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    detect.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    detect.add_argument("--batch-size", type=positive_int, default=1, help="images per forward pass (default 1)")
    detect.add_argument("--output", type=Path, help="write JSON Lines here instead of stdout")
    detect.add_argument("--annotate", type=Path, metavar="DIR", help="write the images with boxes drawn here")
    add_serve_arguments(commands.add_parser("serve", help="an HTTP API and a page to try prompts (gdino[serve])"))
    add_task_arguments(commands)
    add_train_arguments(commands)
    _add_export_arguments(commands.add_parser("export", help="export the model for other runtimes (gdino[onnx])"))
    return parser


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="text, image and detection graphs for onnxruntime (gdino.onnx)")
    onnx.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    onnx.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the export to")
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    onnx.add_argument("--quantize", choices=("int8",), default=None, help="dynamic int8 quantisation of the weights")


def export(args: argparse.Namespace) -> int:
    from . import CheckpointError
    from .detector import GroundingDinoForObjectDetection
    from .export.onnx import export_onnx
    from .weights import DEFAULT_MODEL_ID

    try:
        model = GroundingDinoForObjectDetection.from_pretrained(args.model or DEFAULT_MODEL_ID, device="cpu")
    except CheckpointError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    settings = export_onnx(model, args.out, opset=args.opset, dtype=args.dtype, quantize=args.quantize)
    print(json.dumps({"out": str(args.out), "seconds": settings["export_seconds"], "files": settings["file_sizes"]}))
    return 0


def load_detector(name: str | None, device: str | None, dtype: str) -> object:
    """The PyTorch detector, or the onnxruntime one (``gdino.onnx``) when ``name`` is an ONNX export."""
    from .onnx import is_export  # cheap: onnxruntime is imported by load

    if name is not None and is_export(name):
        from .onnx import load

        return load(name)
    import torch

    from .detector import GroundingDinoForObjectDetection
    from .weights import DEFAULT_MODEL_ID

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return GroundingDinoForObjectDetection.from_pretrained(
        name or DEFAULT_MODEL_ID, device=device, dtype=getattr(torch, DTYPES[dtype])
    ).eval()


def _error(message: str) -> None:
    print(f"gdino: error: {message}", file=sys.stderr, flush=True)


def _prompt(text: str) -> str | list[str]:
    """A prompt with "." separates phrases; one without but with commas is a label list."""
    if "." not in text and "," in text:
        return [label.strip() for label in text.split(",") if label.strip()]
    return text


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


def check_outputs(images: Sequence[str], output: Path | None, annotate: Path | None) -> list[Path] | None:
    """Refuses (``UsageError``) outputs that would overwrite an input image or cannot be written.

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
    if targets is not None:
        clashes = [(t, images[i]) for i, t in enumerate(targets) if _file_id(t) in inputs]
        if clashes:
            more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
            raise UsageError(f"--annotate {annotate} would write {clashes[0][0]} over the input image "
                             f"{clashes[0][1]}{more}; choose another folder")
        check_output_folder(annotate, "--annotate")
    if output is not None:
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
        targets = check_outputs(args.images, args.output, args.annotate)
        device = check_device(args.device)
    except UsageError as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    from . import CheckpointError, PromptError

    prompt = _prompt(args.prompt)
    try:
        model = load_detector(args.model, device, args.dtype)
        model.phrases(prompt)  # validates the prompt (length, at least one phrase) before any image is read
    except (CheckpointError, PromptError) as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    status = 0
    with _sink(args.output) as out:
        for batch in _batches(args.images, args.batch_size):
            for i, image, found in _detect_batch(model, batch, prompt, args):
                path = args.images[i]
                if isinstance(found, str):
                    _error(found)
                    status = EXIT_BAD_INPUT
                    continue
                record = {"image": path, "width": image.width, "height": image.height, "detections": found.to_list()}
                out.write(json.dumps(record) + "\n")
                out.flush()
                if targets is not None and not _annotate(image, found, targets[i]):
                    status = EXIT_BAD_INPUT
    return status


def _detect_batch(model: Any, indices: list[int], prompt: str | list[str],
                  args: argparse.Namespace) -> list[tuple[int, Any, Any]]:
    """(index, image, Detections) per image of the batch, or (index, None, error message) for an
    image that cannot be read or that the model refuses (e.g. too elongated to resize)."""
    from .image import ImageError, load_image

    results: list[tuple[int, Any, Any]] = []
    loaded = []
    for i in indices:
        try:
            loaded.append((i, load_image(args.images[i])))
        except ImageError as e:
            results.append((i, None, str(e)))
    results += _run_model(model, loaded, prompt, args)
    return sorted(results, key=lambda r: r[0])


def _run_model(model: Any, loaded: list[tuple[int, Any]], prompt: str | list[str],
               args: argparse.Namespace) -> list[tuple[int, Any, Any]]:
    """Detects a batch of loaded images; if the model refuses it, image by image, the refused reported."""
    if not loaded:
        return []
    try:
        found = model.detect([image for _, image in loaded], prompt, args.box_threshold, args.text_threshold)
    except ValueError as e:  # ImageError and the like: this input cannot be used, the others can
        if len(loaded) > 1:
            return [r for item in loaded for r in _run_model(model, [item], prompt, args)]
        i, _ = loaded[0]
        return [(i, None, f"{args.images[i]}: {e}")]
    return [(i, image, f) for (i, image), f in zip(loaded, found)]


def _annotate(image: Any, found: Any, target: Path) -> bool:
    """Draws the detections into ``target``; False (and one error line) if it cannot be written."""
    from .draw import draw_detections

    try:
        draw_detections(image, found).save(target)
    except OSError as e:
        _error(f"cannot write {target}: {e.strerror or e}")
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .server import main as serve

        return serve(args)
    if args.command in ("label", "eval"):
        from .commands import main as run_task

        return run_task(args)
    if args.command in ("train", "shapes"):
        from .train_command import main as run_training

        return run_training(args)
    if args.command == "export":
        return export(args)
    from .chunking import on_chunk
    from .progress import ChunkProgress

    with on_chunk(ChunkProgress()):  # a long label list runs in passes: show them on stderr
        return detect(args)


if __name__ == "__main__":
    sys.exit(main())
