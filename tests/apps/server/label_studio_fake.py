"""A stand-in for Label Studio's file routes, on loopback in a thread, for the ML backend tests.

It serves ``/data/upload/1/NAME`` and ``/data/local-files/?d=NAME`` with a legacy token (``Token
legacy``) or an access token (``Bearer`` from ``/api/token/refresh/`` for the refresh token
``REFRESH``), 401 otherwise; ``/open/NAME`` to anyone; ``/big`` (more bytes than asked for, said
in Content-Length or not) and ``/redirect?to=URL``. It records each request's path and
Authorization header.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def jwt(payload: dict[str, Any]) -> str:
    """An unsigned-looking JWT (the backend does not check signatures: Label Studio does)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


REFRESH = jwt({"token_type": "refresh", "exp": 4102444800, "user_id": "1"})
ACCESS = jwt({"token_type": "access", "exp": int(time.time()) + 300, "user_id": "1"})


class FakeLabelStudio(ThreadingHTTPServer):
    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.seen: list[tuple[str, str | None]] = []
        self.refreshes = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeLabelStudio

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, length: bool = True, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/big":
            self._send(200, b"x" * 5000, length="nolength" not in query)
        elif url.path == "/redirect":
            self._send(302, b"", headers={"Location": query["to"][0]})
        elif url.path.startswith("/open/"):
            self._file(url.path.removeprefix("/open/"))
        elif url.path.startswith(("/data/upload/1/", "/data/local-files/", "/tasks/")):
            if self.headers.get("Authorization") not in ("Token legacy", f"Bearer {ACCESS}"):
                self._send(401, b'{"detail": "Invalid token."}')
            else:
                self._file(query["d"][0] if "d" in query else url.path.rpartition("/")[2])
        else:
            self._send(404, b"not found")

    def _file(self, name: str) -> None:
        data = self.server.files.get(name)
        self._send(200, data) if data is not None else self._send(404, b"no such file")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/token/refresh/" and body.get("refresh") == REFRESH:
            self.server.refreshes += 1
            self._send(200, json.dumps({"access": ACCESS}).encode())
        else:
            self._send(401, b'{"detail": "Token is invalid"}')


@contextmanager
def fake_label_studio(files: dict[str, bytes]) -> Iterator[FakeLabelStudio]:
    server = FakeLabelStudio(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
