"""Label Studio's ML backend protocol under a path prefix of ``gdino serve`` (``/label-studio``).

Label Studio calls these routes on the model URL of a project (``http://HOST:PORT/label-studio``):

* ``GET /health`` (and the prefix itself): ``{"status": "UP", "model_class": "gdino"}``, no key needed;
* ``POST /setup`` (``{"project", "schema": the labelling config, ...}``): the config is read and its
  labels checked; the answer is the ``model_version`` Label Studio files the predictions under;
* ``POST /predict`` (``{"tasks", "label_config", "params": {"context"}}``): one entry per task in
  ``{"results": [...]}``, each ``{"result": [...], "score", "model_version"}``;
* ``POST /webhook``: Label Studio's events; gdino learns nothing from annotations, so each is acknowledged.

The labels are the config's (:mod:`gdino.integrations.label_studio`): each ``Label``'s value,
``predicted_values`` and ``alias`` are prompted as a label list. When the config has a ``TextArea``
on the image and Label Studio sends its text (interactive pre-annotation), that text is the prompt
instead, and each box gets the label its phrase names. With the server's segmenter (``--masks``)
and a ``BrushLabels`` tool, the best ``--max-masks`` boxes of a task also get brush masks.

Errors are Label Studio's ML backend format, ``{"status": code, "detail": message}`` with that
HTTP status (and gdino's ``error`` kind): 400 for a body that is not its JSON, 422 for a config
without labels or with labels the model cannot prompt, and per task, within a 200 answer (so the
other tasks keep theirs), an entry without ``result``, which Label Studio logs and skips: an image
that cannot be fetched (422), is too large (413) or is no image (400). A request whose tasks all
fail is answered with the first one's status. Label Studio shows the status; the message is also
logged by ``gdino serve``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image

from gdino import __version__
from gdino.apps.server.batching import Abandoned, Batcher, Job, QueueFull, ShuttingDown
from gdino.apps.server.label_studio_images import LabelStudioImages, LabelStudioSettings
from gdino.apps.server.requests import limited
from gdino.apps.server.segmenting import Masked
from gdino.apps.server.settings import ApiError, Settings
from gdino.inference.detections import Detections
from gdino.integrations.label_studio import (
    LabelStudioError,
    Tool,
    read_config,
    read_prompt_field,
    results,
    values_for_phrases,
)
from gdino.processing.image import ImageError
from gdino.processing.prompts import TextInput, prompt_from_text
from gdino.processing.text import PromptError

log = logging.getLogger(__name__)

BODY_SLACK = 1024 * 1024  # the tasks' JSON besides any image data they carry
TRAIN_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")
Checks = tuple[Callable[[TextInput], int], Callable[[bytes], tuple[Image.Image, bytes]]]


@dataclass(frozen=True)
class Plan:
    """What one predict request runs on each task: the tools, the prompt, whether to segment."""

    tools: list[Tool]
    prompt: TextInput
    typed: bool  # the prompt is a TextArea's text: boxes are labelled by their phrases
    masks: bool


def _answer(status: int, kind: str, message: str) -> JSONResponse:
    """Label Studio's ML backend error format (label_studio_ml's ``answer``), with gdino's kind."""
    return JSONResponse({"status": status, "detail": message, "error": kind}, status_code=status)


def _error(exc: ApiError, route: str) -> JSONResponse:
    log.warning("Label Studio %s: %s", route, exc.message)
    return _answer(exc.status, exc.kind, exc.message)


def _refused() -> JSONResponse:
    message = (
        "a valid API key is needed: Basic Authentication in the Label Studio model's settings, the key as password"
    )
    return _answer(401, "unauthorized", message)


def _key_ok(request: Request, key: str | None) -> bool:
    """``X-API-Key``, ``Authorization: Bearer KEY`` or HTTP Basic with the key as password (Label
    Studio's "Basic Authentication" of a model: any user name)."""
    if key is None:
        return True
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    given = request.headers.get("x-api-key")
    if given is None and scheme.lower() == "bearer":
        given = credentials.strip()
    elif given is None and scheme.lower() == "basic":
        try:
            given = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = None
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


async def _body(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, or 400/413 ``ApiError``."""
    try:
        body = json.loads(await limited(request, limit).body())
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "invalid_json", f"the body is not Label Studio's JSON: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object, as Label Studio sends")
    return body


def _config(body: dict[str, Any], field: str) -> str:
    config = body.get(field)
    if not isinstance(config, str) or not config.strip():
        raise ApiError(422, "invalid_config", f"the request has no labelling config ({field!r})")
    return config


def _tools(config: str) -> list[Tool]:
    try:
        return read_config(config)
    except LabelStudioError as exc:
        raise ApiError(422, "invalid_config", str(exc)) from None


def _typed_prompt(config: str, context: Any) -> str | None:
    """The text of the config's TextArea in an interactive request's context, if any."""
    field = read_prompt_field(config)
    if field is None or not isinstance(context, dict) or not isinstance(context.get("result"), list):
        return None
    for item in context["result"]:
        if isinstance(item, dict) and item.get("from_name") == field and isinstance(item.get("value"), dict):
            texts = item["value"].get("text")
            if isinstance(texts, list) and texts and isinstance(texts[0], str) and texts[0].strip():
                return texts[0].strip()
    return None


def add_label_studio_routes(
    app: FastAPI,
    batcher: Batcher,
    settings: Settings,
    label_studio: LabelStudioSettings,
    checks: Checks,
    model_version: str,
) -> None:
    """Mounts the ML backend routes under ``label_studio.prefix``."""
    check_prompt, prepare = checks
    images = LabelStudioImages(label_studio, settings.max_upload_bytes)
    router = APIRouter(prefix=label_studio.prefix.rstrip("/"), tags=["Label Studio ML backend"])
    body_limit = settings.max_upload_bytes * 4 // 3 + BODY_SLACK

    async def checked_prompt(prompt: TextInput) -> None:
        try:
            await run_in_threadpool(check_prompt, prompt)  # tokenising a long label list takes seconds
        except ApiError as exc:
            raise ApiError(exc.status, exc.kind, f"the labelling config's labels: {exc.message}") from None

    @router.get("/health")
    @router.get("/")
    @router.get("", include_in_schema=False)
    async def health() -> dict[str, str]:
        """Label Studio's health check (no key needed)."""
        return {"status": "UP", "model_class": "gdino", "model_version": model_version}

    @router.post("/setup")
    async def setup(request: Request) -> Response:
        """Reads the project's labelling config (``schema``) and checks its labels."""
        if not _key_ok(request, settings.api_key):
            return _refused()
        try:
            tools = _tools(_config(await _body(request, body_limit), "schema"))
            await checked_prompt(list(tools[0].prompt_texts))
        except ApiError as exc:
            return _error(exc, "setup")
        return JSONResponse({"model_version": model_version})

    @router.post("/webhook")
    async def webhook(request: Request) -> Response:
        """Label Studio's events: acknowledged (gdino does not train from annotations)."""
        if not _key_ok(request, settings.api_key):
            return _refused()
        try:
            action = (await _body(request, body_limit)).get("action")
        except ApiError as exc:
            return _error(exc, "webhook")
        if action not in TRAIN_EVENTS:
            return JSONResponse({"status": "Unknown event"})
        return JSONResponse({"status": "ok", "result": None}, status_code=201)

    @router.post("/predict")
    async def predict(request: Request) -> Response:
        """Predictions for the tasks: one entry of ``results`` per task, in order."""
        if not _key_ok(request, settings.api_key):
            return _refused()
        try:
            body = await _body(request, body_limit)
            tasks = body.get("tasks")
            if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
                raise ApiError(400, "invalid_json", "'tasks' must be a list of task objects, as Label Studio sends")
            plan = await make_plan(body)
        except ApiError as exc:
            return _error(exc, "predict")
        answers: list[dict[str, Any]] = []
        for start in range(0, len(tasks), batcher.max_batch):  # a wave at a time: the queue's bound holds
            wave = tasks[start : start + batcher.max_batch]
            answers.extend(await asyncio.gather(*(predict_task(task, plan, request) for task in wave)))
        failed = [a for a in answers if "result" not in a]
        if tasks and len(failed) == len(answers):
            return _answer(failed[0]["status"], failed[0]["error"], "; ".join(a["detail"] for a in failed[:5]))
        return JSONResponse({"results": answers})

    async def make_plan(body: dict[str, Any]) -> Plan:
        config = _config(body, "label_config")
        tools = _tools(config)
        params = body.get("params")
        typed = _typed_prompt(config, params.get("context") if isinstance(params, dict) else None)
        prompt: TextInput = list(tools[0].prompt_texts)
        if typed is not None:
            prompt = prompt_from_text(typed)
            await run_in_threadpool(check_prompt, prompt)
        else:
            await checked_prompt(prompt)
        masks = batcher.segmenter is not None and any(t.kind == "BrushLabels" for t in tools)
        return Plan(tools, prompt, typed is not None, masks)

    async def predict_task(task: dict[str, Any], plan: Plan, request: Request) -> dict[str, Any]:
        task_id = task.get("id")
        try:
            data = task.get("data")
            key = plan.tools[0].image_key
            if not isinstance(data, dict) or not isinstance(data.get(key), str):
                raise ApiError(422, "missing_image", f"the task has no image in its data[{key!r}]")
            raw = await run_in_threadpool(images.fetch, data[key], task_id)
            found = await detect(raw, plan, request)
        except ApiError as exc:
            log.warning("Label Studio predict, task %s: %s", task_id, exc.message)
            return {"status": exc.status, "error": exc.kind, "detail": f"task {task_id}: {exc.message}"}
        return prediction(found, plan, model_version)

    async def detect(raw: bytes, plan: Plan, request: Request) -> Detections | Masked:
        try:
            with batcher.reserve():
                image, key = await run_in_threadpool(prepare, raw)
                job = Job(image, key, plan.prompt, None, None, plan.masks)
                return await batcher.run(job, request.is_disconnected)
        except QueueFull as exc:
            raise ApiError(503, "busy", str(exc)) from None
        except (ShuttingDown, Abandoned) as exc:
            raise ApiError(503, "shutting_down", str(exc)) from None
        except PromptError as exc:
            raise ApiError(422, "invalid_prompt", str(exc)) from None
        except ImageError as exc:
            raise ApiError(400, "invalid_image", str(exc)) from None

    app.include_router(router)


def prediction(found: Detections | Masked, plan: Plan, model_version: str) -> dict[str, Any]:
    """One task's prediction: its results, their mean score and the model version."""
    parts = [found.masked, found.unmasked] if isinstance(found, Masked) else [found]
    result: list[dict[str, Any]] = []
    scores: list[float] = []
    for part in parts:
        values = values_for_phrases(list(part.labels), plan.tools[0]) if plan.typed else None
        result.extend(results(part, plan.tools, values))
        scores.extend(float(s) for s in part.scores)
    score = round(sum(scores) / len(scores), 4) if scores else 0.0
    return {"result": result, "score": score, "model_version": model_version}


def model_version(model_name: str, segmenter_name: str | None) -> str:
    """The version Label Studio files predictions under: gdino's, the model's and the segmenter's names."""
    version = f"gdino-{__version__}-{PurePath(model_name).name or model_name}"
    return version + (f"+{PurePath(segmenter_name).name}" if segmenter_name else "")
