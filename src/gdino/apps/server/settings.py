"""The service's settings and its user-error type."""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Limits and batching of the service.

    Attributes:
        max_upload_bytes: largest image file (413 past it); a JSON body may be 4/3 of it (base64).
        max_pixels: largest width x height (413 past it), checked before the pixels are decoded.
        max_prompt_chars: longest prompt text (413 past it), checked before tokenising (the token limit
            is the model's); a label list may have 16 times as many characters in all.
        max_labels: most labels in one label list (413 past it), checked before tokenising.
        max_chunks: most label chunks (413 past it): a label list is run as one pass of the encoder
            and decoder per chunk of at most 256 tokens, so this bounds the worker's time per request.
        max_masks: with ``masks=true``, most detections of one request given a mask: the best ones
            (answers list them first); the others are answered without one. This bounds the
            segmenter's time per request (one image encoding and at most this many box decodings).
        max_queue: requests admitted (waiting or running) at once; past it 503 with Retry-After.
        max_batch: most requests the worker runs as one group.
        batch_wait_ms: how long the worker waits for more requests to group.
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, and
            ``/healthz`` shows the model's name or path only with the key.
        shutdown_seconds: on SIGTERM, how long requests in flight may take before they are cancelled
            (queued jobs are answered 503 at once, a running label list stops at its next chunk).
    """

    max_upload_bytes: int = 20 * MB
    max_pixels: int = 40_000_000
    max_prompt_chars: int = 4096
    max_labels: int = 2000
    max_chunks: int = 32
    max_masks: int = 100
    max_queue: int = 32
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    api_key: str | None = None
    shutdown_seconds: float = 10.0


class ApiError(Exception):
    """A user error: answered as ``{"error": kind, "detail": message}`` with ``status``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers
