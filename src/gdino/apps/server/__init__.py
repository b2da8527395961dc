"""``gdino serve``: detection over HTTP and a page to try prompts (needs ``pip install 'gdino[serve]'``).

This module imports nothing beyond the standard library, so the command line can register the
``serve`` options without FastAPI installed; ``gdino.apps.server.app`` holds the application.
"""

from __future__ import annotations

import argparse
import os

from gdino.apps.arguments import (
    UsageError,
    add_model_arguments,
    check_device,
    error,
    non_negative_float,
    port,
    positive_float,
    positive_int,
)
from gdino.apps.masking import add_masks_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gdino serve``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("GDINO_API_KEY"),
        help="require this key: Authorization: Bearer KEY or X-API-Key: KEY (default: $GDINO_API_KEY)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest image upload (default 20)")
    parser.add_argument("--max-pixels", type=positive_int, default=40_000_000, help="largest image, width x height")
    parser.add_argument(
        "--max-prompt-chars", type=positive_int, default=4096, help="longest prompt text (default 4096)"
    )
    parser.add_argument(
        "--max-labels", type=positive_int, default=2000, help="most labels in one request (default 2000)"
    )
    parser.add_argument(
        "--max-chunks",
        type=positive_int,
        default=32,
        help="most label chunks (encoder+decoder passes) in one request (default 32)",
    )
    parser.add_argument(
        "--max-masks",
        type=positive_int,
        default=100,
        help="with --masks: most detections of one request given a mask, the best (default 100)",
    )
    parser.add_argument("--max-queue", type=positive_int, default=32, help="requests admitted at once; past it 503")
    parser.add_argument("--max-batch", type=positive_int, default=8, help="requests grouped into one worker pass")
    parser.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0, help="wait for more requests to group")
    parser.add_argument(
        "--shutdown-seconds",
        type=non_negative_float,
        default=10.0,
        help="on SIGTERM, how long requests in flight may still take (default 10)",
    )
    add_model_arguments(parser)
    add_masks_argument(parser, "answer each detection's mask to requests with masks=true")
    add_label_studio_arguments(parser)


def add_label_studio_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the Label Studio ML backend routes."""
    parser.add_argument(
        "--label-studio-prefix",
        type=_prefix,
        default="/label-studio",
        help="path of the Label Studio ML backend routes (default /label-studio)",
    )
    parser.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio's URL, to fetch the images stored there (default: $LABEL_STUDIO_URL)",
    )
    parser.add_argument(
        "--label-studio-api-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="Label Studio's personal access token or legacy token (default: $LABEL_STUDIO_API_KEY)",
    )


def _prefix(text: str) -> str:
    """A URL path prefix such as /label-studio."""
    if not text.startswith("/") or text.rstrip("/") == "" or any(c in text for c in "?#% "):
        raise argparse.ArgumentTypeError(f"a path such as /label-studio, got {text!r}")
    return text.rstrip("/")


def main(args: argparse.Namespace) -> int:
    """Runs ``gdino serve``; returns the exit status (2 when the server extra is not installed)."""
    try:
        from gdino.apps.server.app import serve
    except ImportError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic", "multipart", "python_multipart"):
            raise
        return error(f"gdino serve needs {exc.name}: pip install 'gdino[serve]'")
    try:
        args.device = check_device(args.device)
    except UsageError as exc:
        return error(str(exc))
    url = getattr(args, "label_studio_url", None)
    if url and not url.startswith(("http://", "https://")):
        return error(f"--label-studio-url must be an http(s) URL such as http://localhost:8080, got {url!r}")
    return serve(args)
