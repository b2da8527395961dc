"""Task images for the Label Studio ML backend routes, fetched from Label Studio or the web.

A task's image is what its data holds: a path on Label Studio (``/data/upload/3/x.jpg``,
``/data/local-files/?d=dir/x.jpg``), a cloud-storage URI (``s3://...``, fetched through Label
Studio's presign route), or a plain http(s) URL. Paths on Label Studio are fetched from
``LabelStudioSettings.url`` with its API key; that key is sent to Label Studio's own origin only,
never to other hosts, nor on a redirect elsewhere. The key is either a legacy token (sent as
``Authorization: Token KEY``) or a personal access token (a JWT refresh token: exchanged at
``/api/token/refresh/`` for an access token, sent as ``Bearer``, renewed before it expires).

Downloads are bounded: at most ``max_bytes`` (the server's ``--max-upload-mb``) and
``timeout_seconds`` in all. Every failure is an :class:`ApiError` whose message names the image.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import IO, Any

from gdino.apps.server.settings import ApiError

CHUNK = 64 * 1024
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
RENEW_SECONDS = 30.0  # an access token is renewed this long before it expires


@dataclass(frozen=True)
class LabelStudioSettings:
    """Where the Label Studio routes live and how they reach Label Studio.

    Attributes:
        prefix: the routes' path prefix (Label Studio's model URL is ``http://HOST:PORT<prefix>``).
        url: Label Studio's base URL (``http://localhost:8080``), for images stored in Label Studio.
        api_key: Label Studio's legacy token or personal access token (Account & Settings).
        timeout_seconds: most time one image download may take, connecting included.
    """

    prefix: str = "/label-studio"
    url: str | None = None
    api_key: str | None = None
    timeout_seconds: float = 30.0


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def is_jwt(key: str) -> bool:
    """True when ``key`` looks like a JWT (a personal access token): three base64url parts, a JSON header."""
    parts = key.split(".")
    return len(parts) == 3 and isinstance(_jwt_part(parts[0]), dict)


def _jwt_part(part: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (binascii.Error, ValueError):
        return None


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only, dropping the API key when a redirect leaves Label Studio's origin."""

    def redirect_request(self, req: Any, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str) -> Any:
        if _origin(newurl)[0] not in ("http", "https"):
            raise ApiError(422, "image_unreachable", f"{req.full_url} redirects to {newurl}, which is not http(s)")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


class LabelStudioImages:
    """Fetches task images (blocking: run it in a thread); one per server, shared by its requests."""

    def __init__(self, settings: LabelStudioSettings, max_bytes: int) -> None:
        self.settings = settings
        self.max_bytes = max_bytes
        self._opener = urllib.request.build_opener(_Redirects())
        self._lock = threading.Lock()
        self._access: tuple[str, float] | None = None  # (access token, when to renew it)

    def url(self, ref: str, task_id: Any = None) -> str:
        """The URL of a task's image reference.

        Raises:
            ApiError: 422 for a Label Studio path without ``settings.url``, or an unsupported scheme.
        """
        scheme = urllib.parse.urlsplit(ref).scheme.lower()
        if scheme in ("http", "https"):
            return ref
        base = self.settings.url
        if scheme in CLOUD_SCHEMES:
            fileuri = base64.urlsafe_b64encode(ref.encode()).decode()
            return self._on_label_studio(f"/tasks/{task_id}/presign/?fileuri={fileuri}", ref, base)
        if scheme:
            raise ApiError(422, "image_unreachable", f"the image {ref!r} is not an http(s) URL nor a Label Studio path")
        path = ref if ref.startswith("/") else "/" + ref
        if path.startswith("/upload/"):
            path = "/data" + path  # what older imports stored
        return self._on_label_studio(path, ref, base)

    def _on_label_studio(self, path: str, ref: str, base: str | None) -> str:
        if not base:
            raise ApiError(
                422,
                "label_studio_url_missing",
                f"the image {ref!r} is stored in Label Studio: start gdino serve with --label-studio-url URL "
                "and --label-studio-api-key KEY (or $LABEL_STUDIO_URL and $LABEL_STUDIO_API_KEY)",
            )
        return base.rstrip("/") + path

    def fetch(self, ref: str, task_id: Any = None) -> bytes:
        """The image's bytes (at most ``max_bytes``).

        Raises:
            ApiError: 413 past ``max_bytes``; 422 when it cannot be had (unreachable, an HTTP error,
                Label Studio refusing the API key, a timeout), the message saying which.
        """
        url = self.url(ref, task_id)
        request = urllib.request.Request(url, headers={"User-Agent": "gdino", **self._auth_headers(url)})
        deadline = time.monotonic() + self.settings.timeout_seconds
        try:
            with self._opener.open(request, timeout=self.settings.timeout_seconds) as answer:
                return self._read(answer, url, deadline)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, url) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, unknown host, timeout, bad URL
            reason = getattr(exc, "reason", exc)
            raise ApiError(422, "image_unreachable", f"cannot fetch the image {url}: {reason}") from None

    def _read(self, answer: Any, url: str, deadline: float) -> bytes:
        length = answer.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise self._too_large(url)
        data = bytearray()
        while chunk := answer.read(CHUNK):
            data += chunk
            if len(data) > self.max_bytes:
                raise self._too_large(url)
            if time.monotonic() > deadline:
                raise ApiError(
                    422, "image_unreachable", f"the image {url} took more than {self.settings.timeout_seconds} s"
                )
        return bytes(data)

    def _too_large(self, url: str) -> ApiError:
        return ApiError(413, "too_large", f"the image {url} is larger than {self.max_bytes} bytes (--max-upload-mb)")

    def _http_error(self, exc: urllib.error.HTTPError, url: str) -> ApiError:
        on_label_studio = bool(self.settings.url) and _origin(url) == _origin(self.settings.url or "")
        if on_label_studio and exc.code in (401, 403):
            with self._lock:
                self._access = None  # a revoked access token: the next request asks for a new one
            given = "refused the API key" if self.settings.api_key else "needs an API key"
            return ApiError(
                422,
                "label_studio_refused_key",
                f"Label Studio {given} ({exc.code} for {url}): give gdino serve --label-studio-api-key "
                "(Account & Settings > Personal Access Token, or a legacy token)",
            )
        return ApiError(422, "image_unreachable", f"cannot fetch the image {url}: HTTP {exc.code} {exc.reason}")

    def _auth_headers(self, url: str) -> dict[str, str]:
        """The API key for Label Studio's own origin; nothing for other hosts."""
        key, base = self.settings.api_key, self.settings.url
        if not key or not base or _origin(url) != _origin(base):
            return {}
        if not is_jwt(key):
            return {"Authorization": f"Token {key}"}
        return {"Authorization": f"Bearer {self._access_token(key, base)}"}

    def _access_token(self, refresh: str, base: str) -> str:
        """A current access token for the personal access token ``refresh`` (asked for when none is)."""
        with self._lock:
            if self._access is not None and time.time() < self._access[1]:
                return self._access[0]
            url = base.rstrip("/") + "/api/token/refresh/"
            body = json.dumps({"refresh": refresh}).encode()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json", "User-Agent": "gdino"})
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout_seconds) as answer:
                    access = json.loads(answer.read(CHUNK))["access"]
            except urllib.error.HTTPError as exc:
                raise ApiError(
                    422,
                    "label_studio_refused_key",
                    f"Label Studio refused the personal access token ({exc.code} from {url}): "
                    "give gdino serve a current one (--label-studio-api-key)",
                ) from None
            except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ApiError(422, "image_unreachable", f"cannot reach Label Studio at {url}: {reason}") from None
            payload = _jwt_part(access.split(".")[1]) if isinstance(access, str) and access.count(".") == 2 else None
            expires = float(payload.get("exp", 0)) if isinstance(payload, dict) else 0.0
            self._access = (access, max(expires - RENEW_SECONDS, time.time()))
            return access
