"""Command line: ``gdino detect IMAGE... --prompt TEXT``.

Output is one JSON object per image, a line each (JSON Lines), on stdout or in ``--output``.
Bad input (an unreadable image, an empty or over-long prompt, a missing model) gives a one-line
error on stderr and exit status 2; the other images are still processed and written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from .server import add_arguments as add_serve_arguments  # standard library only; FastAPI is imported by serve
from .commands import add_arguments as add_task_arguments  # label, eval; standard library only

EXIT_BAD_INPUT = 2
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdino", description="Zero-shot object detection with Grounding DINO.")
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("detect", help="detect the prompt's phrases in images")
    detect.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    detect.add_argument("--prompt", required=True, help='"a cat. a remote control." or labels "cat,remote control"')
    detect.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    detect.add_argument("--box-threshold", type=float, default=0.35)
    detect.add_argument("--text-threshold", type=float, default=0.25)
    detect.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    detect.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    detect.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    detect.add_argument("--output", type=Path, help="write JSON Lines here instead of stdout")
    detect.add_argument("--annotate", type=Path, metavar="DIR", help="write the images with boxes drawn here")
    add_serve_arguments(commands.add_parser("serve", help="an HTTP API and a page to try prompts (gdino[serve])"))
    add_task_arguments(commands)
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


@contextmanager
def _sink(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yield f


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def detect(args: argparse.Namespace) -> int:
    from . import CheckpointError, ImageError, PromptError
    from .image import load_image

    prompt = _prompt(args.prompt)
    try:
        model = load_detector(args.model, args.device, args.dtype)
        model.phrases(prompt)  # validates the prompt (length, at least one phrase) before any image is read
    except (CheckpointError, PromptError) as e:
        _error(str(e))
        return EXIT_BAD_INPUT
    status = 0
    written: set[Path] = set()  # annotated files of this run: same-named images must not overwrite each other
    if args.annotate:
        args.annotate.mkdir(parents=True, exist_ok=True)
    with _sink(args.output) as out:
        for batch in _batches(args.images, args.batch_size):
            loaded = []
            for path in batch:
                try:
                    loaded.append((path, load_image(path)))
                except ImageError as e:
                    _error(str(e))
                    status = EXIT_BAD_INPUT
            if not loaded:
                continue
            results = model.detect([img for _, img in loaded], prompt, args.box_threshold, args.text_threshold)
            for (path, image), found in zip(loaded, results):
                record = {"image": path, "width": image.width, "height": image.height, "detections": found.to_list()}
                out.write(json.dumps(record) + "\n")
                out.flush()
                if args.annotate:
                    _annotate(image, found, args.annotate / Path(path).name, written)
    return status


def _annotate(image, found, target: Path, written: set[Path]) -> None:
    from .draw import draw_detections

    if target.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp", ".bmp"):
        target = target.with_suffix(".png")
    stem, n = target.stem, 1
    while target in written:  # a/img.png and b/img.png -> img.png and img-2.png
        n += 1
        target = target.with_name(f"{stem}-{n}{target.suffix}")
    written.add(target)
    draw_detections(image, found).save(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .server import main as serve

        return serve(args)
    if args.command in ("label", "eval"):
        from .commands import main as run_task

        return run_task(args)
    if args.command == "export":
        return export(args)
    for name in ("box_threshold", "text_threshold"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            _error(f"--{name.replace('_', '-')} must be between 0 and 1")
            return EXIT_BAD_INPUT
    return detect(args)


if __name__ == "__main__":
    sys.exit(main())
