"""Command-line options and checks shared by ``gdino detect``, ``label``, ``eval`` and ``serve``.

``add_model_arguments`` defines ``--model``, ``--device`` and ``--dtype`` once for every command,
and ``load_detector`` turns them into a loaded model.

The ``argparse`` types (``fraction``, ``positive_int``, ...) refuse a value outside its range while
the arguments are parsed (usage and the reason on stderr, exit status 2). The other checks run
before any model work and raise ``UsageError``, which the commands print as one line (exit 2):
the device, and whether an output file or folder can be written. Standard library only at
import time (``check_device`` imports torch when called).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gdino.utils.hub import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    import torch


N = TypeVar("N", int, float)

EXIT_BAD_INPUT = 2
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UsageError(ValueError):
    """A command-line value that cannot be used: reported as one line, exit status 2."""


def error(message: str) -> int:
    """Prints ``gdino: error: message`` on stderr; returns the exit status for bad input (2)."""
    print(f"gdino: error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


# --------------------------------------------------------------------------- the model options


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--dtype``, the same for every command."""
    parser.add_argument("--model", default=None, help="hub id, local directory or original .pth file")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--runtime",
        choices=("onnxruntime", "openvino"),
        default=None,
        help="what runs an ONNX export given as --model (default onnxruntime)",
    )


def model_name(args: argparse.Namespace) -> str:
    """``--model``, or the published checkpoint when it is not given."""
    return str(args.model or DEFAULT_MODEL_ID)


def torch_dtype(name: str) -> torch.dtype:
    """``--dtype``'s value (fp32, bf16, fp16) as a torch dtype."""
    import torch

    dtype: torch.dtype = getattr(torch, DTYPES[name])
    return dtype


def load_detector(args: argparse.Namespace, threads: int | None = None) -> Any:
    """The model the options name, in eval mode (``--device`` already checked by ``check_device``),
    or the ONNX detector (``gdino.runtime.onnx`` on ``--runtime``, ``threads`` intra-op threads) when it
    names an export.

    Raises:
        CheckpointError: ``--runtime`` given for a model that is not an ONNX export, or the model cannot be loaded.
    """
    from gdino.runtime.onnx import is_export  # cheap: onnxruntime is imported by load

    name = model_name(args)
    runtime = getattr(args, "runtime", None)
    threads = threads or getattr(args, "threads", None)
    if is_export(name):
        from gdino.runtime.onnx import load

        return load(name, threads=threads, runtime=runtime or "onnxruntime")
    from gdino.utils.hub import CheckpointError

    if runtime is not None:
        raise CheckpointError(
            f"--runtime {runtime} runs ONNX exports and {name} is not one; "
            "write one with `gdino export onnx --model MODEL --out DIR`"
        )
    import torch

    from gdino.inference.detector import GroundingDinoForObjectDetection

    if threads:  # matrix kernels split their sums by thread count: scores can differ in the 4th decimal
        torch.set_num_threads(threads)
    return GroundingDinoForObjectDetection.from_pretrained(
        name, device=args.device, dtype=torch_dtype(args.dtype)
    ).eval()


# --------------------------------------------------------------------------- argparse types


def fraction(text: str) -> float:
    """A number from 0 to 1 (thresholds, IoU)."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of 1 or more (batch sizes, counts, limits)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (sizes in MB)."""
    value = _number(text, float)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of 0 or more (waiting times)."""
    value = _number(text, float)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 (any free port) to 65535."""
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}")
    return value


def _number(text: str, kind: Callable[[str], N]) -> N:
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


# --------------------------------------------------------------------------- tiled detection


def add_tile_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tile SIZE [--tile-overlap 0.2] [--tile-merge greedynmm|nms] [--no-full-image]``: tiled detection."""
    parser.add_argument(
        "--tile",
        type=tile_size,
        default=None,
        metavar="SIZE",
        help="detect on overlapping SIZE x SIZE tiles (at least 32 pixels), merged, for small objects in large images",
    )
    parser.add_argument(
        "--tile-overlap", type=overlap_ratio, default=None, help="share of a tile its neighbours overlap (default 0.2)"
    )
    parser.add_argument(
        "--tile-merge",
        choices=("greedynmm", "nms"),
        default=None,
        help="greedynmm: merge an object's boxes from several tiles into one (default); nms: keep the best",
    )
    parser.add_argument(
        "--no-full-image", action="store_true", help="with --tile: detect on the tiles only, not also the whole image"
    )


def tile_size(text: str) -> int:
    """A tile side in pixels: a whole number of at least 32 (``gdino.inference.tiles.MIN_TILE_SIZE``)."""
    value = _number(text, int)
    if value < 32:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 32 pixels, got {text!r}")
    return value


def overlap_ratio(text: str) -> float:
    """A tile overlap: a number in [0, 0.9)."""
    value = _number(text, float)
    if not 0.0 <= value < 0.9:
        raise argparse.ArgumentTypeError(f"must be a number from 0 up to (not including) 0.9, got {text!r}")
    return value


def tile_settings(args: argparse.Namespace) -> Any:
    """The ``TileSettings`` the tile options give, None without ``--tile``.

    Raises:
        UsageError: a tile option given without ``--tile``.
    """
    size = getattr(args, "tile", None)
    others = [
        name
        for name, given in (
            ("--tile-overlap", args.tile_overlap is not None),
            ("--tile-merge", args.tile_merge is not None),
            ("--no-full-image", args.no_full_image),
        )
        if given
    ]
    if size is None:
        if others:
            raise UsageError(f"{others[0]} sets how tiles are detected: give it with --tile SIZE")
        return None
    from gdino.inference.tiles import TileSettings

    overlap = 0.2 if args.tile_overlap is None else args.tile_overlap
    return TileSettings(size, overlap, not args.no_full_image, args.tile_merge or "greedynmm")


def tile_options(model: Any, tiles: Any, batch_size: int) -> dict[str, Any]:
    """``detect``'s keyword arguments for ``tiles`` ({} without): tiles with ``batch_size`` tiles a pass.

    Raises:
        UsageError: tiles asked of a model that cannot tile (an ONNX export).
    """
    if tiles is None:
        return {}
    import inspect

    if "tiles" not in inspect.signature(model.detect).parameters:
        raise UsageError("--tile runs with the PyTorch model; an ONNX export (--model DIR) does not tile")
    return {"tiles": tiles, "batch_size": batch_size}


# --------------------------------------------------------------------------- checks before the model


def check_device(name: str | None) -> str:
    """The device to run on: ``name`` if torch can use it here, else ``UsageError``; None -> cuda or cpu."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); use --device cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS (Apple GPU) is not available here; use --device cpu")
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # noqa: BLE001 (whatever the backend raises, it cannot be used)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"--device {name} cannot be used here: {reason}") from None
    return name


def check_output_file(path: Path, option: str) -> None:
    """Raises ``UsageError`` unless ``path`` can be written (its folder is created; the file is not changed)."""
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file name")
    _make_folder(path.parent, f"the folder of {option} {path}")
    try:
        if path.exists():
            with open(path, "ab"):  # opened for writing, not changed
                pass
        else:
            with open(path, "xb"):
                pass
            path.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write {option} {path}: {exc.strerror or exc}") from None


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads, for this process and (``gdino label --ray``) each actor alike."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice, here; one in each Ray actor); the same N gives "
        "the same scores wherever it runs on the same kind of CPU",
    )


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--overwrite``: the one way to let a command replace a file that is already there."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} already there (by default an existing file is never replaced; inputs never are)",
    )


def check_not_there(path: Path, option: str, overwrite: bool) -> None:
    """Refuses (``UsageError``) an output file that already exists, unless ``overwrite``.

    gdino never replaces a file it cannot tell it wrote; ``--overwrite`` says the user can.
    """
    if not overwrite and (path.exists() or path.is_symlink()):
        raise UsageError(f"{option} {path} already exists; give --overwrite to replace it, or another path")


def check_output_folder(path: Path, option: str) -> None:
    """Raises ``UsageError`` unless ``path`` is (or can be made) a folder that files can be written in."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder")
    _make_folder(path, f"{option} {path}")
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".gdino-write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write in {option} {path}: {exc.strerror or exc}") from None


def _make_folder(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"cannot create {what}: a file is in the way") from None
    except OSError as exc:
        raise UsageError(f"cannot create {what}: {exc.strerror or exc}") from None


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same existing file (through links, relative paths or hard links)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
