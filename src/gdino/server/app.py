"""The HTTP application: ``POST /v1/detect``, ``GET /healthz``, the page at ``/``, OpenAPI at ``/docs``.

``create_app(model)`` builds it around a loaded model; ``serve`` is ``gdino serve``. Every user
error is a JSON answer ``{"error": kind, "detail": message}`` with a 4xx status; 500 means a bug.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.exceptions import HTTPException

from .. import __version__
from ..detector import GroundingDinoForObjectDetection
from ..image import ImageError
from ..text import PromptError
from . import MB
from .batching import Batcher, Job, QueueFull
from .requests import FORM_SLACK, check_resizable, decode_image, limited, read_json, read_multipart
from .schema import ERRORS, REQUEST_BODY, DetectResponse
from .settings import ApiError, Settings

__all__ = ["ApiError", "Settings", "create_app", "serve", "serve_in_thread"]

log = logging.getLogger("gdino.server")


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
        openapi_extra={"requestBody": REQUEST_BODY},
        responses={200: {"model": DetectResponse}, **ERRORS},
    )
    async def detect(request: Request) -> JSONResponse:
        """Finds the prompt's phrases (or the labels) in the image.

        Send multipart/form-data (an ``image`` file field) or JSON (``image`` as base64). The
        answer is the command line's JSON: ``image``, ``width``, ``height`` and ``detections``,
        each with ``box`` (x0, y0, x1, y1 pixels), ``score``, ``label`` and ``label_id``.
        """
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            req = await read_multipart(limited(request, settings.max_upload_bytes + FORM_SLACK), settings)
        elif content_type == "application/json":
            req = await read_json(limited(request, settings.max_upload_bytes * 4 // 3 + FORM_SLACK), settings)
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
    from ..onnx import is_export
    from ..onnx import load as load_onnx

    name = str(args.model or DEFAULT_MODEL_ID)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    try:
        if is_export(name):  # an ONNX export runs on onnxruntime (gdino.onnx)
            model = load_onnx(name, threads=args.threads or None)
        else:
            model = GroundingDinoForObjectDetection.from_pretrained(name, device=device, dtype=dtype).eval()
    except CheckpointError as exc:
        print(f"gdino: error: {exc}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"gdino: warning: serving on {args.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(create_app(model, settings, name), host=args.host, port=args.port, log_level="info")
    return 0
