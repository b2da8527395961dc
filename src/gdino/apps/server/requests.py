"""Reading a detection request: multipart or JSON bodies, prompts, thresholds and image bytes.

Every user error raises ``ApiError`` with a 4xx status; nothing here lets a bad upload through to
the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message

from gdino.apps.server.settings import ApiError, Settings
from gdino.apps.server.tiling import TILE_FIELDS, read_tiles
from gdino.inference.tiles import TileSettings
from gdino.processing.image import ImageError, ImageSettings, load_image, resized_size
from gdino.processing.prompts import TextInput, prompt_from_text

log = logging.getLogger(__name__)

# Decoders the server accepts (those this Pillow has); the others (EPS, ICO, PSD, ...) are refused
# to keep the attack surface small. JPEG includes MPO (phone cameras' multi-picture JPEG).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF", "PPM")
FORM_SLACK = 64 * 1024  # room for the thresholds, a name and the like next to the image in a request body
PART_OVERHEAD = 256  # a multipart part's delimiter (a boundary is at most 70 bytes) and headers; a JSON string's quotes
OTHER_FIELDS = ("prompt", "box_threshold", "text_threshold", "masks", *TILE_FIELDS)  # besides the image, labels


def max_form_fields(settings: Settings) -> int:
    """Most text form fields the multipart parser reads: ``max_labels`` labels, one a field, and the others."""
    return settings.max_labels + len(OTHER_FIELDS)


def max_text_bytes(settings: Settings) -> int:
    """Most bytes of one text form field: labels of 16 x ``max_prompt_chars`` characters in all, UTF-8, with commas."""
    return 4 * 16 * settings.max_prompt_chars + settings.max_labels


def body_limit(settings: Settings, content_type: str) -> int:
    """Most request body bytes read: the image (base64 in JSON), and room for prompts or labels within the limits.

    A body past it is 413 ``too_large``; every request within the other limits fits (one label a
    field or comma-separated, any UTF-8, JSON escapes included), and one request stays bounded.
    """
    image = settings.max_upload_bytes * 4 // 3 if content_type == "application/json" else settings.max_upload_bytes
    text = 12 * 17 * settings.max_prompt_chars  # the labels and a prompt; "\uXXXX" twice for a character past U+FFFF
    return image + FORM_SLACK + text + PART_OVERHEAD * (max_form_fields(settings) + 1)


@dataclass
class DetectRequest:
    data: bytes
    name: str
    prompt: TextInput
    box_threshold: float | None  # None: the model's default
    text_threshold: float | None
    masks: bool = False  # each detection's mask too (the server's segmenter, --masks)
    tiles: TileSettings | None = None  # detect on tiles (gdino.apps.server.tiling), None: the whole image


def _flag(value: Any, name: str) -> bool:
    """A request's yes/no field: JSON true/false, or a form's "true"/"false" (also 1/0, yes/no, on/off)."""
    if value is None or value is False or value == "":
        return False
    if value is True:
        return True
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ApiError(422, "invalid_request", f"{name} must be true or false, got {value!r}"[:200])


def _threshold(value: Any, name: str) -> float | None:
    """A request's threshold; None when it gives none (the model's default, as ``detect``'s)."""
    if value is None or value == "":
        return None
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


def _prompt(prompt: Any, labels: Any, settings: Settings) -> TextInput:
    """The request's prompt or label list, checked for type and size (not yet tokenised).

    Sizes past the server's limits are 413 (a setting can raise them); a malformed prompt is 422.
    """
    max_chars = settings.max_prompt_chars
    if prompt is not None and labels is not None:
        raise ApiError(422, "invalid_prompt", "give either prompt or labels, not both")
    if labels is not None:
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ApiError(422, "invalid_prompt", "labels must be a list of strings")
        if sum(len(x) for x in labels) > 16 * max_chars:
            raise ApiError(
                413,
                "prompt_too_long",
                f"the labels have more than {16 * max_chars} characters in all (the server's --max-prompt-chars x 16)",
            )
        return _label_count([_utf8(x.strip(), "labels") for x in labels], settings.max_labels)
    if prompt is None:
        raise ApiError(422, "invalid_prompt", "give a prompt (e.g. 'a cat. a remote control.') or labels")
    if not isinstance(prompt, str):
        raise ApiError(422, "invalid_prompt", f"prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > max_chars:
        raise ApiError(
            413,
            "prompt_too_long",
            f"the prompt has {len(prompt)} characters; the server takes at most {max_chars} (--max-prompt-chars)",
        )
    text = prompt_from_text(_utf8(prompt, "prompt"))
    return text if isinstance(text, str) else _label_count(text, settings.max_labels)


def _label_count(labels: list[str], max_labels: int) -> list[str]:
    """``labels`` when there are at most ``max_labels`` of them, else 413 (before any tokenising)."""
    if len(labels) > max_labels:
        raise ApiError(
            413,
            "too_many_labels",
            f"{len(labels)} labels; the server takes at most {max_labels} per request (--max-labels)",
        )
    return labels


def limited(request: Request, limit: int) -> Request:
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


class _Multipart(MultiPartParser):
    """starlette's multipart parser with the server's limits, and refusing a body cut before its closing boundary.

    python-multipart's ``finalize`` does not check that the body is complete, and starlette then
    returns the fields read so far; its ``on_end`` callback says the closing boundary was read.
    """

    def __init__(self, request: Request, settings: Settings) -> None:
        self.complete = False
        self.settings = settings
        super().__init__(
            request.headers,
            self._to_the_end(request.stream()),
            max_files=1,
            max_fields=max_form_fields(settings),
            max_part_size=max_text_bytes(settings),
        )

    def on_end(self) -> None:
        self.complete = True

    async def _to_the_end(self, stream: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """``stream``, then 400 if the parser has not read the closing boundary (raised in ``parse``: files closed)."""
        async with aclosing(stream):
            async for chunk in stream:
                yield chunk
        if not self.complete:
            raise ApiError(400, "invalid_multipart", "the multipart body ends before its closing boundary (truncated?)")

    async def read(self) -> FormData:
        """The form, or ``ApiError``: 413 past the server's limits, 422 for a second file, 400 for malformed data."""
        try:
            return await self.parse()
        except MultiPartException as exc:
            raise self._error(exc.message) from None

    def _error(self, message: str) -> ApiError:
        settings = self.settings
        if message.startswith("Too many fields"):  # starlette's words for the max_fields limit
            return ApiError(
                413,
                "too_many_labels",
                f"more than {max_form_fields(settings)} form fields; the server takes at most {settings.max_labels} "
                f"labels per request (--max-labels), each its own field or comma-separated, besides "
                f"{', '.join(OTHER_FIELDS)}",
            )
        if message.startswith("Part exceeded"):  # max_part_size, which applies to text fields only
            return ApiError(
                413,
                "prompt_too_long",
                f"a form field has more than {max_text_bytes(settings)} bytes, more than the labels may have "
                f"in all ({16 * settings.max_prompt_chars} characters: the server's --max-prompt-chars x 16)",
            )
        if message.startswith("Too many files"):
            return ApiError(422, "too_many_files", "send one file per request, the image (field 'image')")
        return ApiError(400, "invalid_multipart", f"the body is not valid multipart/form-data: {message}"[:300])


async def read_multipart(request: Request, settings: Settings) -> DetectRequest:
    form = await _Multipart(request, settings).read()
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
            prompt=_prompt(form.get("prompt"), split, settings),
            box_threshold=_threshold(form.get("box_threshold"), "box_threshold"),
            text_threshold=_threshold(form.get("text_threshold"), "text_threshold"),
            masks=_flag(form.get("masks"), "masks"),
            tiles=read_tiles(form.get),
        )
    finally:
        await form.close()


async def read_json(request: Request, settings: Settings) -> DetectRequest:
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
        prompt=_prompt(body.get("prompt"), body.get("labels"), settings),
        box_threshold=_threshold(body.get("box_threshold"), "box_threshold"),
        text_threshold=_threshold(body.get("text_threshold"), "text_threshold"),
        masks=_flag(body.get("masks"), "masks"),
        tiles=read_tiles(body.get),
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
    except Exception as exc:  # noqa: BLE001 (Pillow raises OSError, ValueError, SyntaxError ... on corrupt data)
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
        raise ApiError(
            422,
            "invalid_image",
            f"the image ({image.width}x{image.height}) is too thin to resize "
            f"for the model (longest side at most {settings.longest_edge}); crop or pad it",
        )
