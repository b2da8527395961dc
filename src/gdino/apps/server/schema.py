"""What ``POST /v1/detect`` answers and accepts, as the OpenAPI document (``/openapi.json``) shows it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Rle(BaseModel):
    size: list[int]  # [height, width]
    counts: str  # COCO compressed RLE (column-major runs), as pycocotools' mask.encode writes it


class Detection(BaseModel):
    box: list[float]  # x0, y0, x1, y1 in pixels of the original image
    score: float
    label: str
    label_id: int
    mask: Rle | None = None  # with masks=true, for the best max_masks detections
    mask_score: float | None = None  # the segmenter's predicted IoU of the mask


class DetectResponse(BaseModel):
    image: str
    width: int
    height: int
    detections: list[Detection]
    masked: int | None = None  # with masks=true: the first `masked` detections have a mask


class ErrorResponse(BaseModel):
    error: str
    detail: str


THRESHOLDS = {
    "box_threshold": {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "default: the model's (0.35 for the published models)",
    },
    "text_threshold": {
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "description": "default: the model's (0.25 for the published models)",
    },
}
MASKS = {
    "type": "boolean",
    "description": "also each detection's mask (COCO RLE) and mask_score, for the best max_masks "
    "detections; 422 on a server started without --masks",
}
PROMPT = {"type": "string", "description": '"a cat. a remote control."; without "." but with commas, a label list'}
REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "format": "binary"},
                    "prompt": PROMPT,
                    "labels": {"type": "array", "items": {"type": "string"}, "description": "instead of prompt"},
                    **THRESHOLDS,
                    "masks": MASKS,
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
                    "prompt": PROMPT,
                    "labels": {"type": "array", "items": {"type": "string"}, "description": "instead of prompt"},
                    **THRESHOLDS,
                    "masks": MASKS,
                },
            }
        },
    },
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "not an image (or corrupt), or malformed JSON or multipart (a truncated body included)",
        401: "missing or wrong API key",
        413: "past a limit a flag raises: upload, pixels, prompt characters, labels (--max-labels), chunks",
        415: "neither multipart/form-data nor application/json",
        422: "no image or a second file, an empty prompt, thresholds outside [0, 1], an image too thin to resize, "
        "masks=true on a server without a segmenter",
        503: "queue full; retry after the Retry-After header's seconds",
    }.items()
}
