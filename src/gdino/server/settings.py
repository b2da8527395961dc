"""The service's settings and its user-error type."""

from __future__ import annotations

from dataclasses import dataclass

from . import MB


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
