"""The HTTP application: ``POST /v1/detect``, ``GET /healthz``, the page at ``/``, OpenAPI at ``/docs``.

``create_app(model)`` builds it around a loaded model; ``serve`` is ``gdino serve``. Every user
error is a JSON answer ``{"error": kind, "detail": message}`` with a 4xx status; 500 means a bug.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import math
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from .. import __version__
from ..detector import GroundingDinoForObjectDetection
from ..image import ImageError, ImageSettings, load_image, resized_size
from ..text import PromptError, TextInput
from . import MB
from .batching import Batcher, Job, QueueFull

log = logging.getLogger("gdino.server")

# Decoders the server accepts (those this Pillow has); the others (EPS, ICO, PSD, ...) are refused
# to keep the attack surface small. JPEG includes MPO (phone cameras' multi-picture JPEG).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF", "PPM")
FORM_SLACK = 64 * 1024  # room for the prompt and other fields next to the image in a request body


@dataclass(frozen=True)
class Settings:
    """Limits and batching of the service.

    Attributes:
        max_upload_bytes: largest image file (413 past it); a JSON body may be 4/3 of it (base64).
        max_pixels: largest width x height (413 past it), checked before the pixels are decoded.
        max_prompt_chars: longest prompt text, checked before tokenising (the token limit is the model's);
            a label list may have 16 times as many characters in all.
        max_queue: requests admitted (waiting or running) at once; past it 503 with Retry-After.
        max_batch: most requests the worker runs as one group.
        batch_wait_ms: how long the worker waits for more requests to group.
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """

    max_upload_bytes: int = 20 * MB
    max_pixels: int = 40_000_000
    max_prompt_chars: int = 4096
    max_queue: int = 32
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    api_key: str | None = None


class ApiError(Exception):
    """A user error: answered as ``{"error": kind, "detail": message}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


# --------------------------------------------------------------------------- response models (docs)


class Detection(BaseModel):
    box: list[float]  # x0, y0, x1, y1 in pixels of the original image
    score: float
    label: str
    label_id: int


class DetectResponse(BaseModel):
    image: str
    width: int
    height: int
    detections: list[Detection]


class ErrorResponse(BaseModel):
    error: str
    detail: str


_THRESHOLDS = {
    "box_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.35},
    "text_threshold": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.25},
}
_PROMPT = {"type": "string", "description": '"a cat. a remote control."; without "." but with commas, a label list'}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "prompt": _PROMPT,
                    "labels": {"type": "array", "items": {"type": "string"}, "description": "instead of prompt"},
                    **_THRESHOLDS,
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "description": "base64 of the file, or a data: URL"},
                    "name": {"type": "string", "description": "echoed as the answer's image"},
                    "prompt": _PROMPT,
                    "labels": {"type": "array", "items": {"type": "string"}, "description": "instead of prompt"},
                    **_THRESHOLDS,
                },
            }
        },
    },
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "not an image, or a malformed request",
        401: "missing or wrong API key",
        413: "upload or image too large",
        415: "neither multipart/form-data nor application/json",
        422: "empty or over-long prompt, thresholds outside [0, 1]",
        503: "queue full; retry after the Retry-After header's seconds",
    }.items()
}


# --------------------------------------------------------------------------- input


@dataclass
class DetectRequest:
    data: bytes
    name: str
    prompt: TextInput
    box_threshold: float
    text_threshold: float


def prompt_from_text(text: str) -> TextInput:
    """The command line's rule: a prompt with "." separates phrases; one without but with commas is a label list."""
    if "." not in text and "," in text:
        return [label.strip() for label in text.split(",") if label.strip()]
    return text


def _threshold(value: Any, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_threshold", f"{name} must be a number between 0 and 1, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ApiError(422, "invalid_threshold", f"{name} must be between 0 and 1, got {value!r}")
    return number


def _utf8(text: str, what: str) -> str:
    """``text`` when it can be written as UTF-8 (no lone surrogates such as JSON's "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_prompt", f"the {what} is not valid Unicode (a lone surrogate?)") from None
    return text


def _prompt(prompt: Any, labels: Any, max_chars: int) -> TextInput:
    """The request's prompt or label list, checked for type and length (not yet tokenised)."""
    if prompt is not None and labels is not None:
        raise ApiError(422, "invalid_prompt", "give either prompt or labels, not both")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ApiError(422, "invalid_prompt", "labels must be a list of strings")
        if sum(len(x) for x in labels) > 16 * max_chars:
            raise ApiError(422, "invalid_prompt", f"the labels have more than {16 * max_chars} characters in all")
        return [_utf8(x.strip(), "labels") for x in labels]
    if prompt is None:
        raise ApiError(422, "invalid_prompt", "give a prompt (e.g. 'a cat. a remote control.') or labels")
    if not isinstance(prompt, str):
        raise ApiError(422, "invalid_prompt", f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > max_chars:
        raise ApiError(422, "invalid_prompt", f"the prompt has {len(prompt)} characters; at most {max_chars}")
    return prompt_from_text(_utf8(prompt, "prompt"))


def _limited(request: Request, limit: int) -> Request:
    """The request, reading at most ``limit`` body bytes (413 past it, also without Content-Length)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "too_large", f"the request body has {int(length)} bytes; at most {limit} accepted")
    received = 0
    receive = request.receive

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise ApiError(413, "too_large", f"the request body is larger than {limit} bytes")
        return message

    return Request(request.scope, limited_receive)


async def _read_multipart(request: Request, settings: Settings) -> DetectRequest:
    form = await request.form(max_files=1, max_fields=32, max_part_size=settings.max_upload_bytes)
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_image", "send the image as a file field named 'image'")
        data = await upload.read(settings.max_upload_bytes + 1)
        labels = form.getlist("labels")
        split = [p for x in labels if isinstance(x, str) for p in x.split(",") if p.strip()] if labels else None
        return DetectRequest(
            data=data,
            name=(upload.filename or "upload").encode("utf-8", "replace").decode(),
            prompt=_prompt(form.get("prompt"), split, settings.max_prompt_chars),
            box_threshold=_threshold(form.get("box_threshold"), "box_threshold", 0.35),
            text_threshold=_threshold(form.get("text_threshold"), "text_threshold", 0.25),
        )
    finally:
        await form.close()


async def _read_json(request: Request, settings: Settings) -> DetectRequest:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_json", "the body must be a JSON object with image and prompt")
    image = body.get("image")
    if not isinstance(image, str) or not image:
        raise ApiError(422, "missing_image", "give the image as a base64 string (or a data: URL) in 'image'")
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        data = base64.b64decode("".join(image.split()), validate=True)  # line breaks allowed
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_image", "'image' is not valid base64") from None
    name = body.get("name")
    return DetectRequest(
        data=data,
        name=name.encode("utf-8", "replace").decode() if isinstance(name, str) else "upload",
        prompt=_prompt(body.get("prompt"), body.get("labels"), settings.max_prompt_chars),
        box_threshold=_threshold(body.get("box_threshold"), "box_threshold", 0.35),
        text_threshold=_threshold(body.get("text_threshold"), "text_threshold", 0.25),
    )


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Upload bytes -> RGB image, refusing files and images over the limits before decoding them.

    Raises:
        ApiError: 413 over ``max_bytes`` or ``max_pixels`` (decompression bombs included), 400
            for data that is not an image of a supported format or is corrupt.
    """
    if len(data) > max_bytes:
        raise ApiError(413, "too_large", f"the image file is larger than {max_bytes} bytes")
    if not data:
        raise ApiError(400, "invalid_image", "the image is empty (0 bytes)")
    too_many = ApiError(413, "too_many_pixels", f"the image has more than {max_pixels} pixels")
    Image.init()
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    try:
        img = Image.open(io.BytesIO(data), formats=formats)  # reads the header only
        width, height = img.size
        if width * height > max_pixels:
            raise too_many
        img.load()
        return load_image(img)  # EXIF orientation, RGB
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise too_many from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, "invalid_image", f"not an image, or not one of {', '.join(formats)}") from None
    except ImageError as exc:
        raise ApiError(400, "invalid_image", str(exc)) from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, EOFError ... on corrupt data
        log.info("undecodable upload: %r", exc)
        raise ApiError(400, "invalid_image", f"cannot decode the image (truncated or corrupt?): {exc}") from None


def check_resizable(image: Image.Image, settings: ImageSettings) -> None:
    """Refuses (422) an image so thin that the processor would resize its short side to 0 pixels.

    ``detect`` raises a bare ValueError for such an image (e.g. 1x5000); this keeps it a user error.
    """
    if not settings.do_resize:
        return
    height, width = resized_size(image.height, image.width, settings.shortest_edge, settings.longest_edge)
    if min(height, width) < 1:
        raise ApiError(422, "invalid_image", f"the image ({image.width}x{image.height}) is too thin to resize "
                       f"for the model (longest side at most {settings.longest_edge}); crop or pad it")  # fmt: skip


# --------------------------------------------------------------------------- app


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


def _auth(key: str | None) -> list[Any]:
    """The dependency that checks the API key, or none when no key is set."""
    if key is None:
        return []
    expected = key.encode()
    header = APIKeyHeader(name="X-API-Key", auto_error=False)
    bearer = HTTPBearer(auto_error=False)

    def check(
        api_key: str | None = Depends(header), credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> None:
        given = api_key if api_key is not None else (credentials.credentials if credentials else None)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            message = "a valid API key is needed: Authorization: Bearer KEY or X-API-Key: KEY"
            raise ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})

    return [Depends(check)]


def create_app(
    model: GroundingDinoForObjectDetection, settings: Settings | None = None, model_name: str = "model"
) -> FastAPI:
    """The application around a loaded model (loaded once, used by the batcher's one thread)."""
    settings = settings or Settings()
    batcher = Batcher(model, settings.max_queue, settings.max_batch, settings.batch_wait_ms / 1000)
    page = resources.files("gdino.server").joinpath("static/index.html").read_text(encoding="utf-8")

    def prepare(data: bytes) -> tuple[Image.Image, bytes]:
        """Decoded, checked image and the key under which equal uploads share their encoding (a thread's work)."""
        image = decode_image(data, settings.max_upload_bytes, settings.max_pixels)
        check_resizable(image, model.processor.image_settings)
        return image, hashlib.blake2b(data, digest_size=16).digest()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(
        title="gdino",
        summary="Zero-shot object detection with Grounding DINO",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, "invalid_request", str(exc.errors()))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal", "internal server error (a bug in gdino; see the server log)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and the batcher's state (no API key needed)."""
        s = batcher.stats
        return {
            "status": "ok",
            "model": model_name,
            "device": str(model.device),
            "queue": {"pending": batcher.pending, "max": batcher.max_queue},
            "batches": {"groups": s.groups, "requests": s.requests, "images_encoded": s.images_encoded,
                        "largest_group": s.largest_group},
        }  # fmt: skip

    @app.post(
        "/v1/detect",
        response_model=None,
        dependencies=_auth(settings.api_key),
        openapi_extra={"requestBody": _REQUEST_BODY},
        responses={200: {"model": DetectResponse}, **_ERRORS},
    )
    async def detect(request: Request) -> JSONResponse:
        """Finds the prompt's phrases (or the labels) in the image.

        Send multipart/form-data (an ``image`` file field) or JSON (``image`` as base64). The
        answer is the command line's JSON: ``image``, ``width``, ``height`` and ``detections``,
        each with ``box`` (x0, y0, x1, y1 pixels), ``score``, ``label`` and ``label_id``.
        """
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            req = await _read_multipart(_limited(request, settings.max_upload_bytes + FORM_SLACK), settings)
        elif content_type == "application/json":
            req = await _read_json(_limited(request, settings.max_upload_bytes * 4 // 3 + FORM_SLACK), settings)
        else:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
        try:
            model.phrases(req.prompt)  # tokenises: empty, over-long or phrase-less prompts are refused here
        except PromptError as exc:
            raise ApiError(422, "invalid_prompt", str(exc)) from None
        try:
            with batcher.reserve():
                image, key = await run_in_threadpool(prepare, req.data)
                found = await batcher.run(Job(image, key, req.prompt, req.box_threshold, req.text_threshold))
        except QueueFull as exc:
            raise ApiError(503, "busy", str(exc), {"Retry-After": str(batcher.retry_after())}) from None
        except PromptError as exc:  # checked above; kept a user error should the model find more
            raise ApiError(422, "invalid_prompt", str(exc)) from None
        except ImageError as exc:
            raise ApiError(400, "invalid_image", str(exc)) from None
        width, height = found.image_size
        return JSONResponse({"image": req.name, "width": width, "height": height, "detections": found.to_list()})

    return app


# --------------------------------------------------------------------------- running


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs ``app`` with uvicorn in a background thread; yields its base URL (``port=0``: a free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def serve(args: argparse.Namespace) -> int:
    """``gdino serve``: loads the model once and runs the application with uvicorn."""
    import torch
    import uvicorn

    from ..weights import DEFAULT_MODEL_ID, CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_pixels=args.max_pixels,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        api_key=args.api_key or None,
    )
    name = str(args.model or DEFAULT_MODEL_ID)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(name, device=device, dtype=dtype).eval()
    except CheckpointError as exc:
        print(f"gdino: error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"gdino: warning: serving on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(create_app(model, settings, name), host=args.host, port=args.port, log_level="info")
    return 0
