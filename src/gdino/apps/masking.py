"""``--masks [MODEL]``: the option, loading its segmenter once, and the checks made before any image is read.

Shared by ``gdino detect`` and ``gdino serve``. Standard library only at import time (the segmenter
and torch are imported when one is loaded).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from gdino.apps.arguments import UsageError, model_name, torch_dtype

DEFAULT_SEGMENTER = "facebook/sam2.1-hiera-tiny"


def add_masks_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--masks [MODEL]``: alone the SAM 2.1 tiny hub id, or a segmenter hub id, directory or file."""
    parser.add_argument(
        "--masks",
        nargs="?",
        const=DEFAULT_SEGMENTER,
        default=None,
        metavar="MODEL",
        help=f"{what} (pip install 'gdino[masks]'): a SAM 2.1 or SAM hub id, local directory, original "
        f".pt/.pth file or gdino-shapes-sam; alone, {DEFAULT_SEGMENTER}",
    )


def load_masks_segmenter(args: argparse.Namespace, detector: Any) -> Any:
    """The segmenter ``--masks`` names, on ``--device`` in ``--dtype``; None without ``--masks``.

    Called once, after the detector is loaded and before any image is read.

    Raises:
        UsageError: pycocotools is missing (masks are answered as COCO RLE), the detector is an
            ONNX export without segmenter graphs, or the segmenter cannot be loaded.
    """
    name = getattr(args, "masks", None)
    if name is None:
        return None
    if importlib.util.find_spec("pycocotools") is None:
        raise UsageError("--masks writes COCO RLE, which needs pycocotools: pip install 'gdino[masks]'")
    from gdino.runtime.onnx import is_export

    if is_export(model_name(args)):
        exported = getattr(detector, "segmenter", None)  # the export's own segmenter graphs, when it has them
        if exported is None:
            raise UsageError(
                f"--masks: the ONNX export {model_name(args)} has no segmenter graphs; export them with "
                "`gdino export onnx --masks MODEL`, or give a PyTorch checkpoint as --model"
            )
        return exported
    return _load(str(name), args.device, torch_dtype(args.dtype))


def load_export_segmenter(name: str | None) -> Any:
    """``gdino export onnx --masks``'s segmenter, float32 on the CPU; None without ``--masks``.

    Raises:
        UsageError: it cannot be loaded (one line).
    """
    return None if name is None else _load(name, "cpu", None)


def _load(name: str, device: str | None, dtype: Any) -> Any:
    """``load_segmenter(name)``, its refusals as one ``UsageError`` line."""
    from gdino.utils.hub import CheckpointError

    try:
        from gdino.inference.segmenter import load_segmenter
    except ImportError as exc:
        raise UsageError(f"--masks needs gdino's segmenter, which cannot be imported here: {exc}") from None
    try:
        return load_segmenter(name, device=device, dtype=dtype)
    except (CheckpointError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--masks {name}: {reason}") from None
