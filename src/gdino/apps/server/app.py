"""The HTTP application: ``POST /v1/detect``, ``GET /healthz``, the page at ``/``, OpenAPI at ``/docs``.

``create_app(model)`` builds it around a loaded model (and, for ``masks=true``, a segmenter);
``serve`` is ``gdino serve``. Every user
error is a JSON answer ``{"error": kind, "detail": message}`` with a 4xx status; 500 means a bug.
Every route that answers GET answers HEAD too, and every answer has ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import hmac
import logging
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gdino import __version__
from gdino.apps.server.batching import Abandoned, Batcher, Job, QueueFull, ShuttingDown
from gdino.apps.server.label_studio_images import LabelStudioSettings
from gdino.apps.server.label_studio_routes import add_label_studio_routes, model_version
from gdino.apps.server.requests import body_limit, check_resizable, decode_image, limited, read_json, read_multipart
from gdino.apps.server.schema import ERRORS, REQUEST_BODY, DetectResponse
from gdino.apps.server.segmenting import Masked
from gdino.apps.server.settings import MB, ApiError, Settings
from gdino.apps.server.tiling import check_tile_cost
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.processing.classes import ClassQuery, queries_for_images
from gdino.processing.image import ImageError
from gdino.processing.prompts import TextInput
from gdino.processing.text import PromptError

__all__ = ["ApiError", "Settings", "create_app", "serve", "serve_in_thread"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- app


NOSNIFF = (b"x-content-type-options", b"nosniff")
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by the client


def _error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**(headers or {}), "X-Content-Type-Options": "nosniff"}  # also for a 500, outside the middleware
    return JSONResponse({"error": kind, "detail": message}, status_code=status, headers=headers)


class HeadAndNosniff:
    """ASGI middleware: HEAD is answered as GET without the body; every answer gets ``nosniff``.

    Uptime checks use HEAD; FastAPI's routes answer only the methods they name.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = dict(scope, method="GET")  # a copy: the server still knows it answers HEAD

        async def send_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != NOSNIFF[0]]
                message = {**message, "headers": [*headers, NOSNIFF]}
            elif message["type"] == "http.response.body" and head:
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, receive, send_headers)


def _key_given(request: Request) -> str | None:
    """The API key of ``X-API-Key`` or ``Authorization: Bearer``, if any."""
    key = request.headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def _detection_defaults(model: Any) -> dict[str, float]:
    """The thresholds a request without any gets: the model's own (an ONNX export carries them too)."""
    config = getattr(model, "config", None)
    if config is not None:
        return dict(config.detection_defaults())
    settings = getattr(model, "settings", {})
    return {k: float(settings.get(k, v)) for k, v in (("box_threshold", 0.35), ("text_threshold", 0.25))}


def _key_matches(given: str | None, key: str | None) -> bool:
    """True when no key is set, or ``given`` is it (compared in constant time)."""
    return key is None or (given is not None and hmac.compare_digest(given.encode(), key.encode()))


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
    model: GroundingDinoForObjectDetection,
    settings: Settings | None = None,
    model_name: str = "model",
    segmenter: Any = None,
    segmenter_name: str = "segmenter",
    label_studio: LabelStudioSettings | None = None,
) -> FastAPI:
    """The application around a loaded model (loaded once, used by the batcher's one thread).

    With ``segmenter`` (a ``gdino.inference.segmenter.Segmenter``, run by the same thread), a
    request with ``masks=true`` also gets each detection's mask; without one such a request is 422.
    Label Studio's ML backend routes are under ``label_studio.prefix`` (``/label-studio``).
    """
    settings = settings or Settings()
    batcher = Batcher(
        model, settings.max_queue, settings.max_batch, settings.batch_wait_ms / 1000, segmenter, settings.max_masks
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.shutdown()  # whatever is still queued is answered 503, not run
        batcher.stop(settings.shutdown_seconds)

    app = FastAPI(
        title="gdino",
        summary="Zero-shot object detection with Grounding DINO",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served below from the swagger-ui-bundle package, not a CDN
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(HeadAndNosniff)
    _add_docs(app)
    _add_error_handlers(app)
    _add_page(app)
    _add_health(app, model, batcher, settings, (model_name, segmenter_name if segmenter is not None else None))
    _add_detect(app, model, batcher, settings)
    version = model_version(model_name, segmenter_name if segmenter is not None else None)
    ls_settings = label_studio or LabelStudioSettings()
    add_label_studio_routes(app, batcher, settings, ls_settings, _checks(model, settings), version)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": kind, "detail": message}``: users' mistakes 4xx, bugs 500."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, exc.kind, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, exc: ClientDisconnect) -> Response:
        log.info("%s %s: the client disconnected before it sent the whole request", request.method, request.url.path)
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, "invalid_request", str(exc.errors()))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, "internal", "internal server error (a bug in gdino; see the server log)")


def _add_page(app: FastAPI) -> None:
    """The page to try prompts at ``/`` and its icon."""
    static = resources.files("gdino.apps.server").joinpath("static")
    page = static.joinpath("index.html").read_text(encoding="utf-8")
    favicon = static.joinpath("favicon.svg").read_bytes()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        csp = (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'"
        )
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def icon() -> Response:
        return Response(favicon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def _add_health(
    app: FastAPI,
    model: GroundingDinoForObjectDetection,
    batcher: Batcher,
    settings: Settings,
    names: tuple[str, str | None],
) -> None:
    """``GET /healthz``; ``names``: the model's and the segmenter's (None without one)."""
    model_name, segmenter_name = names

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, Any]:
        """Liveness and the batcher's state.

        No API key is needed; the model's name or path is given only with the key, if one is set.
        """
        s = batcher.stats
        answer: dict[str, Any] = {"status": "ok"}
        masks: dict[str, Any] = {"available": segmenter_name is not None}
        if segmenter_name is not None:
            masks["max_per_request"] = settings.max_masks
        if _key_matches(_key_given(request), settings.api_key):
            answer["model"] = model_name
            if segmenter_name is not None:
                masks["model"] = segmenter_name
        return {
            **answer,
            "device": str(model.device),
            "defaults": _detection_defaults(model),
            "masks": masks,
            "queue": {"pending": batcher.pending, "max": batcher.max_queue},
            "batches": {
                "groups": s.groups,
                "requests": s.requests,
                "images_encoded": s.images_encoded,
                "largest_group": s.largest_group,
                "dropped": s.dropped,
            },
        }


def _add_detect(app: FastAPI, model: GroundingDinoForObjectDetection, batcher: Batcher, settings: Settings) -> None:
    """``POST /v1/detect``: the request read and checked off the event loop, then run by the batcher."""
    check_prompt, prepare = _checks(model, settings)

    @app.post(
        "/v1/detect",
        response_model=None,
        dependencies=_auth(settings.api_key),
        openapi_extra={"requestBody": REQUEST_BODY},
        responses={200: {"model": DetectResponse}, **ERRORS},
    )
    async def detect(request: Request) -> Response:
        """Finds the prompt's phrases (or the labels) in the image.

        Send multipart/form-data (an ``image`` file field) or JSON (``image`` as base64). The
        answer is the command line's JSON: ``image``, ``width``, ``height`` and ``detections``,
        each with ``box`` (x0, y0, x1, y1 pixels), ``score``, ``label`` and ``label_id``.
        """
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            req = await read_multipart(limited(request, body_limit(settings, content_type)), settings)
        elif content_type == "application/json":
            req = await read_json(limited(request, body_limit(settings, content_type)), settings)
        else:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
        if req.masks and batcher.segmenter is None:
            raise ApiError(
                422, "masks_unavailable", "this server has no segmenter: start it with `gdino serve --masks [MODEL]`"
            )
        try:
            with batcher.reserve():
                chunks = await run_in_threadpool(check_prompt, req.prompt)  # tokenising a long list takes seconds
                image, key = await run_in_threadpool(prepare, req.data)
                check_tile_cost(image, req.tiles, chunks, settings.max_chunks)  # tiles count as chunks do
                job = Job(image, key, req.prompt, req.box_threshold, req.text_threshold, req.masks, tiles=req.tiles)
                found = await batcher.run(job, request.is_disconnected)
        except QueueFull as exc:
            raise ApiError(503, "busy", str(exc), {"Retry-After": str(batcher.retry_after())}) from None
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5", "Connection": "close"}) from None
        except Abandoned:
            log.info("POST /v1/detect: the client went away before its answer; its job was dropped")
            return Response(status_code=CLIENT_GONE)
        except PromptError as exc:  # checked above; kept a user error should the model find more
            raise ApiError(422, "invalid_prompt", str(exc)) from None
        except ImageError as exc:
            raise ApiError(400, "invalid_image", str(exc)) from None
        width, height = found.image_size
        answer = {"image": req.name, "width": width, "height": height}
        if isinstance(found, Masked):  # RLE-encoding many masks of a large image is a thread's work
            answer.update(detections=await run_in_threadpool(found.to_list), masked=len(found.masked))
        else:
            answer["detections"] = found.to_list()
        return JSONResponse(answer)


def _checks(
    model: GroundingDinoForObjectDetection, settings: Settings
) -> tuple[Callable[[TextInput], int], Callable[[bytes], tuple[Image.Image, bytes]]]:
    """The checks ``/v1/detect`` runs in a thread: of the prompt, and of the image (decoded)."""

    def check_prompt(prompt: TextInput) -> int:
        """Tokenises the prompt (a thread's work, never the event loop's): 422 if malformed, 413 past max_chunks.

        Returns the passes of the encoder and decoder an image needs for it (its label chunks, or 1).
        """
        budget = model.processor.tokenizer.max_text_len - 2  # tokens of a chunk without [CLS] and [SEP]
        if isinstance(prompt, list) and -(-2 * len(prompt) // budget) > settings.max_chunks:
            _too_many_chunks(-(-2 * len(prompt) // budget), settings.max_chunks)  # a label and its "." at least
        try:
            query = queries_for_images(prompt, 1, model.processor.tokenizer)[0]
            if isinstance(query, ClassQuery):
                if len(query.prompts) > settings.max_chunks:
                    _too_many_chunks(len(query.prompts), settings.max_chunks)
                return len(query.prompts)
            model.phrases(query)  # refuses a phrase-less prompt such as ". . ."
            return 1
        except PromptError as exc:
            raise ApiError(422, "invalid_prompt", str(exc)) from None

    def prepare(data: bytes) -> tuple[Image.Image, bytes]:
        """Decoded, checked image and the key under which equal uploads share their encoding (a thread's work)."""
        image = decode_image(data, settings.max_upload_bytes, settings.max_pixels)
        check_resizable(image, model.processor.image_settings)
        return image, hashlib.blake2b(data, digest_size=16).digest()

    return check_prompt, prepare


def _too_many_chunks(chunks: int, limit: int) -> None:
    raise ApiError(
        413,
        "too_many_chunks",
        f"the labels need {chunks} chunks (one pass of the encoder and decoder each, at most 256 "
        f"tokens); the server runs at most {limit} per request (--max-chunks)",
    )


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` with its scripts from the ``swagger-ui-bundle`` package: it works offline."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path is not None:
        app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        if swagger_ui_path is None:
            text = (
                "Swagger UI needs the swagger-ui-bundle package: pip install 'gdino[serve]'. "
                "The API is at openapi.json."
            )
            return HTMLResponse(f"<!doctype html><title>gdino API</title><p>{text}</p>", status_code=404)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"),
            title="gdino API",
            swagger_js_url=root + "/docs/assets/swagger-ui-bundle.js",
            swagger_css_url=root + "/docs/assets/swagger-ui.css",
            swagger_favicon_url=root + "/favicon.ico",
        )


# --------------------------------------------------------------------------- running


def _server(app: FastAPI, config: Any) -> Any:
    """A ``uvicorn.Server`` that, when told to exit (SIGTERM, Ctrl-C), first stops the batcher.

    uvicorn waits for the requests in flight before it shuts the application down; stopping the
    batcher first answers the queued ones 503 at once and ends a running label list at its next
    chunk, so shutting down takes about one pass, not the whole queue (at most ``shutdown_seconds``).
    """
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.batcher.shutdown()
            super().handle_exit(sig, frame)

    return Server(config)


def _log_config() -> dict[str, Any]:
    """uvicorn's logging for ``gdino serve``, with gdino's own lines going to uvicorn's handler too.

    uvicorn configures only its own loggers; without a handler for ``gdino`` Python drops its INFO
    lines (such as a client gone mid-upload) and prints the others bare. ``serve_in_thread`` keeps
    uvicorn's default, so that tests see gdino's records where pytest looks for them (the root logger).
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["gdino"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs ``app`` with uvicorn in a background thread; yields its base URL (``port=0``: a free port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    grace = getattr(getattr(app.state, "settings", None), "shutdown_seconds", 10.0)
    # uvicorn annotates timeout_graceful_shutdown as int but waits any number of seconds
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=grace)  # type: ignore[arg-type]
    server = _server(app, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            threading.Event().wait(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.handle_exit(signal.SIGTERM, None)  # as on SIGTERM
        thread.join(grace + 10)
        sock.close()


def serve(args: argparse.Namespace) -> int:
    """``gdino serve``: loads the model once and runs the application with uvicorn."""
    import torch
    import uvicorn

    from gdino.apps.arguments import UsageError, check_device, error, load_detector, model_name
    from gdino.apps.masking import load_masks_segmenter
    from gdino.utils.hub import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_pixels=args.max_pixels,
        max_prompt_chars=args.max_prompt_chars,
        max_labels=args.max_labels,
        max_chunks=args.max_chunks,
        max_masks=args.max_masks,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        api_key=args.api_key or None,
        shutdown_seconds=args.shutdown_seconds,
    )
    name = model_name(args)
    args.device = args.device or check_device(None)  # main() has checked it; the default when called directly
    try:
        model = load_detector(args, threads=args.threads or None)  # an ONNX export runs on onnxruntime
        segmenter = load_masks_segmenter(args, model)  # None without --masks
    except (CheckpointError, UsageError) as exc:
        return error(str(exc))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(
            f"gdino: warning: serving on {args.host} without --api-key; anyone who can reach it can use it",
            file=sys.stderr,
        )
    label_studio = LabelStudioSettings(args.label_studio_prefix, args.label_studio_url, args.label_studio_api_key)
    app = create_app(model, settings, name, segmenter, str(getattr(args, "masks", None)), label_studio)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        log_config=_log_config(),
        timeout_graceful_shutdown=settings.shutdown_seconds,  # type: ignore[arg-type]  # as above
    )
    _server(app, config).run()
    return 0
