"""``gdino serve``'s API in process (FastAPI's TestClient and httpx's ASGI transport), small model."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import logging
import re
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="python-multipart is not installed: pip install -e '.[serve]'")
import httpx
from fastapi.testclient import TestClient
from PIL import Image

from gdino.apps.server.app import Settings, create_app, serve_in_thread
from gdino.apps.server.batching import Batcher, Job, QueueFull, run_group
from gdino.apps.server.requests import body_limit
from reference import ROOT

PROMPT = "a cat. a remote control."


def load_bench():
    """bench/load_server.py as a module (its load test and helpers are shared with the tests)."""
    spec = importlib.util.spec_from_file_location("load_server", ROOT / "bench" / "load_server.py")
    module = sys.modules.setdefault("load_server", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_dir(small_dir, tmp_path_factory) -> Path:
    """The small test model with 160-pixel images: the server's work, not Swin's, is what these test."""
    return load_bench().fast_copy(small_dir, tmp_path_factory.mktemp("small-160"))


@pytest.fixture(scope="module")
def client(fast_model):
    with TestClient(create_app(fast_model), raise_server_exceptions=False) as c:
        yield c


def expected(fast_model, image: Path | Image.Image, prompt, box_threshold=0.35, text_threshold=0.25, name=None) -> dict:
    found = fast_model.detect(image, prompt, box_threshold, text_threshold)
    width, height = found.image_size
    return {"image": name or Path(image).name, "width": width, "height": height, "detections": found.to_list()}


def post(client, image: bytes | Path, name: str = "img.png", **fields):
    data = image.read_bytes() if isinstance(image, Path) else image
    return client.post("/v1/detect", files={"image": (name, data, "application/octet-stream")}, data=fields)


def png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with (almost) no pixel data: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def assert_error(response, status: int, kind: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if kind is not None:
        assert body["error"] == kind, body
    return body


# --------------------------------------------------------------------------- answers


def test_health_docs_and_page(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["queue"]["max"] == 32
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<svg" in page.text and 'id="threshold"' in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    text = page.text.replace("http://www.w3.org/2000/svg", "")  # a namespace name, not fetched
    assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text


def test_multipart_answers_as_detect(client, fast_model, data_dir):
    image = data_dir / "chelsea.png"
    answer = post(client, image, "chelsea.png", prompt=PROMPT, box_threshold="0.3", text_threshold="0.2")
    assert answer.status_code == 200, answer.text
    assert answer.json() == expected(fast_model, image, PROMPT, 0.3, 0.2)
    assert answer.json()["detections"], "the test model should find something at 0.3"


def test_labels_answer_as_a_label_list(client, fast_model, data_dir):
    image = data_dir / "coffee.png"
    want = expected(fast_model, image, ["cup", "table"])
    repeated = client.post(
        "/v1/detect", files={"image": ("coffee.png", image.read_bytes())}, data={"labels": ["cup", "table"]}
    )
    assert repeated.json() == want
    assert post(client, image, "coffee.png", labels="cup, table").json() == want
    assert post(client, image, "coffee.png", prompt="cup,table").json() == want  # the command line's rule


def test_json_with_base64_and_data_url(client, fast_model, data_dir):
    image = data_dir / "rocket.jpg"
    b64 = base64.b64encode(image.read_bytes()).decode()
    want = expected(fast_model, image, "a rocket.", 0.3, name="r.jpg")
    for encoded in (b64, "data:image/jpeg;base64," + b64):
        answer = client.post(
            "/v1/detect", json={"image": encoded, "name": "r.jpg", "prompt": "a rocket.", "box_threshold": 0.3}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == want
    labels = client.post("/v1/detect", json={"image": b64, "labels": ["rocket", "sky"]})
    assert labels.json() == expected(fast_model, image, ["rocket", "sky"], name="upload")


def test_exif_orientation_and_modes_as_detect(client, fast_model, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.new("RGB", (80, 40), (10, 200, 10)).save(path, exif=exif)
    answer = post(client, path, "rotated.jpg", prompt="a box.", box_threshold="0")
    assert (answer.json()["width"], answer.json()["height"]) == (40, 80)
    assert answer.json() == expected(fast_model, path, "a box.", 0.0)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (50, 30), (0, 0, 255, 128)).save(rgba)
    assert post(client, rgba, "rgba.png", prompt="a box.").json() == expected(fast_model, rgba, "a box.")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "data, status, kind",
    [
        (b"", 400, "invalid_image"),
        (b"this is not an image", 400, "invalid_image"),
        (b"%PDF-1.4\n" + b"0" * 100, 400, "invalid_image"),
        (png()[:60], 400, "invalid_image"),  # truncated
        (png_header_only(200_000, 200_000), 413, "too_many_pixels"),  # past Pillow's own bomb limit
        (png_header_only(8000, 6000), 413, "too_many_pixels"),  # 48 MP: past ours, checked before decoding
    ],
    ids=["empty", "text", "pdf", "truncated", "bomb", "too-many-pixels"],
)
def test_bad_images(client, data, status, kind):
    assert_error(post(client, data, prompt="a cat."), status, kind)


@pytest.mark.parametrize("size", [(1, 5000), (4000, 1)])
def test_too_thin_to_resize(client, size):
    assert_error(post(client, png(size), prompt="a cat."), 422, "invalid_image")


def test_eps_is_refused_without_running_its_decoder(client):
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert_error(post(client, eps, prompt="a cat."), 400, "invalid_image")


@pytest.mark.parametrize(
    "fields, kind",
    [
        ({"prompt": ""}, "invalid_prompt"),
        ({"prompt": "   "}, "invalid_prompt"),
        ({"prompt": ". . ."}, "invalid_prompt"),
        ({"prompt": "cat " * 300}, "invalid_prompt"),  # over 256 tokens
        ({}, "invalid_prompt"),
        ({"prompt": "a cat.", "labels": "cat"}, "invalid_prompt"),
        ({"labels": ", ,"}, "invalid_prompt"),
        ({"prompt": "a cat.", "box_threshold": "1.5"}, "invalid_threshold"),
        ({"prompt": "a cat.", "box_threshold": "-0.1"}, "invalid_threshold"),
        ({"prompt": "a cat.", "text_threshold": "nan"}, "invalid_threshold"),
        ({"prompt": "a cat.", "text_threshold": "high"}, "invalid_threshold"),
    ],
)
def test_bad_prompts_and_thresholds_are_422(client, data_dir, fields, kind):
    assert_error(post(client, data_dir / "chelsea.png", **fields), 422, kind)


@pytest.mark.parametrize(
    "body, status",
    [
        ({"prompt": "a cat."}, 422),
        ({"image": "***not base64***", "prompt": "a cat."}, 400),
        ({"image": base64.b64encode(b"GIF89a nonsense").decode(), "prompt": "a cat."}, 400),
        ({"image": base64.b64encode(png()).decode(), "prompt": 3}, 422),
        ({"image": base64.b64encode(png()).decode(), "labels": "cat"}, 422),
        ({"image": base64.b64encode(png()).decode(), "labels": []}, 422),
        ({"image": base64.b64encode(png()).decode(), "prompt": "a cat.", "box_threshold": True}, 422),
        ({"image": base64.b64encode(png()).decode(), "prompt": "a cat.", "box_threshold": "x"}, 422),
        ([1, 2], 422),
    ],
)
def test_bad_json(client, body, status):
    assert_error(client.post("/v1/detect", json=body), status)


def test_odd_json(client, fast_model, data_dir):
    as_json = {"content-type": "application/json"}
    assert_error(client.post("/v1/detect", content=b"[" * 100_000 + b"]" * 100_000, headers=as_json), 400)
    lone_surrogate = b'{"image": "aGVsbG8=", "prompt": "\\ud800 cat"}'
    assert_error(client.post("/v1/detect", content=lone_surrogate, headers=as_json), 422, "invalid_prompt")
    image = data_dir / "coffee.png"
    wrapped = base64.encodebytes(image.read_bytes()).decode()  # line breaks every 76 characters
    body = json.dumps({"image": wrapped, "prompt": "a cup.", "name": "\ud800.png"})  # ASCII, the surrogate escaped
    answer = client.post("/v1/detect", content=body.encode(), headers=as_json)
    assert answer.status_code == 200, answer.text
    assert answer.json()["detections"] == expected(fast_model, image, "a cup.")["detections"]


def test_malformed_requests(client):
    assert_error(
        client.post("/v1/detect", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(client.post("/v1/detect", content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    assert_error(client.post("/v1/detect", content=b"hello", headers={"content-type": "text/plain"}), 415)
    assert_error(client.post("/v1/detect", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400)
    no_image = client.post("/v1/detect", data={"prompt": "a cat."}, files={"other": ("a", b"b")})
    assert_error(no_image, 422, "missing_image")
    assert_error(client.get("/v1/detect"), 405)
    assert_error(client.get("/nowhere"), 404)


def _multipart(fields: dict, image: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """A whole multipart detect body as httpx writes it, its headers and its closing delimiter."""
    request = httpx.Request("POST", "http://test/v1/detect", files={"image": ("i.png", image)}, data=fields)
    content_type = request.headers["content-type"]
    closing = b"--" + content_type.partition("boundary=")[2].encode() + b"--\r\n"
    return request.read(), {"content-type": content_type}, closing


def test_truncated_multipart_is_400(client):
    """A body that ends before its closing boundary is malformed multipart, not a request without an image."""
    body, headers, closing = _multipart({"prompt": "a cat."}, png())
    assert body.endswith(closing)
    image_at = body.index(b"\x89PNG")
    for cut in (body[: -len(closing)], body[:-3], body[: image_at + 20], body[: body.index(b"a cat.")]):
        body_400 = assert_error(client.post("/v1/detect", content=cut, headers=headers), 400, "invalid_multipart")
        assert "closing boundary" in body_400["detail"], body_400
    assert_error(client.post("/v1/detect", content=b"", headers=headers), 400, "invalid_multipart")
    assert client.post("/v1/detect", content=body, headers=headers).status_code == 200
    assert client.post("/v1/detect", content=body[:-2], headers=headers).status_code == 200  # no CRLF after it: fine
    epilogue = client.post("/v1/detect", content=body + b"an epilogue\r\n", headers=headers)  # RFC 2046 allows one
    assert epilogue.status_code == 200, epilogue.text
    missing = client.post("/v1/detect", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert_error(missing, 400, "invalid_multipart")  # no boundary parameter
    two = client.post("/v1/detect", files=[("image", ("a.png", png())), ("image", ("b.png", png()))])
    assert_error(two, 422, "too_many_files")


def test_upload_limits(fast_model, data_dir):
    image = (data_dir / "chelsea.png").read_bytes()
    settings = Settings(max_upload_bytes=len(image) - 1, max_pixels=10_000)
    with TestClient(create_app(fast_model, settings), raise_server_exceptions=False) as small:
        assert_error(post(small, image, prompt="a cat."), 413, "too_large")
        body = base64.b64encode(image).decode()
        assert_error(small.post("/v1/detect", json={"image": body, "prompt": "a cat."}), 413)
        # no Content-Length (chunked): the limit holds while the body streams in
        big = b" " * (body_limit(settings, "application/json") + 1)  # past the JSON cap (4/3 for base64, the text)
        chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
        streamed = small.post("/v1/detect", content=chunks, headers={"content-type": "application/json"})
        assert_error(streamed, 413, "too_large")
        assert_error(post(small, png((101, 100)), prompt="a cat."), 413, "too_many_pixels")
        assert post(small, png((100, 100)), prompt="a cat.").status_code == 200


# --------------------------------------------------------------------------- auth, bugs, queue


def test_api_key(fast_model, data_dir):
    with TestClient(create_app(fast_model, Settings(api_key="s3cret"))) as locked:
        image = data_dir / "chelsea.png"
        assert_error(post(locked, image, prompt="a cat."), 401, "unauthorized")
        assert_error(locked.post("/v1/detect", headers={"X-API-Key": "wrong"}, json={}), 401)
        assert_error(locked.post("/v1/detect", headers={"Authorization": "Bearer wrong"}, json={}), 401)
        for headers in ({"Authorization": "Bearer s3cret"}, {"X-API-Key": "s3cret"}):
            answer = locked.post(
                "/v1/detect", headers=headers, files={"image": ("c.png", image.read_bytes())}, data={"prompt": "a cat."}
            )
            assert answer.status_code == 200, answer.text
        assert locked.get("/healthz").status_code == 200
        assert locked.get("/").status_code == 200


def test_unexpected_errors_are_json_500(fast_model, data_dir, monkeypatch):
    app = create_app(fast_model)
    monkeypatch.setattr(app.state.batcher, "model", None)  # a bug: the worker calls None
    with TestClient(app, raise_server_exceptions=False) as broken:
        assert_error(post(broken, data_dir / "chelsea.png", prompt="a cat."), 500, "internal")


def _asgi_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_full_queue_answers_503_with_retry_after(fast_model, data_dir):
    app = create_app(fast_model, Settings(max_queue=2))
    release = threading.Event()
    detect = fast_model.detect

    def slow_detect(*args, **kwargs):
        release.wait(30)
        return detect(*args, **kwargs)

    app.state.batcher.model = type(
        "Slow", (), {"detect": staticmethod(slow_detect), "encode_image": staticmethod(fast_model.encode_image)}
    )()
    files = {"image": ("c.png", (data_dir / "chelsea.png").read_bytes())}

    async def scenario():
        async with _asgi_client(app) as c:
            held = [asyncio.create_task(c.post("/v1/detect", files=files, data={"prompt": "a cat."})) for _ in range(2)]
            while app.state.batcher.pending < 2:
                await asyncio.sleep(0.01)
            refused = await c.post("/v1/detect", files=files, data={"prompt": "a cat."})
            release.set()
            return refused, await asyncio.gather(*held)

    try:
        refused, held = asyncio.run(scenario())
    finally:
        release.set()
        app.state.batcher.stop()
    assert_error(refused, 503, "busy")
    assert int(refused.headers["Retry-After"]) >= 1
    assert [r.status_code for r in held] == [200, 200]
    assert app.state.batcher.pending == 0


def test_concurrent_requests_share_a_group(fast_model, data_dir):
    app = create_app(fast_model, Settings(max_batch=8, batch_wait_ms=200))
    cases = [
        (data_dir / "chelsea.png", PROMPT),
        (data_dir / "chelsea.png", "a sofa."),
        (data_dir / "coffee.png", ["cup", "table"]),
        (data_dir / "chelsea.png", ["cat"]),
    ]

    async def scenario():
        async with _asgi_client(app) as c:
            return await asyncio.gather(
                *[
                    c.post(
                        "/v1/detect",
                        json={
                            "image": base64.b64encode(path.read_bytes()).decode(),
                            "name": path.name,
                            "labels" if isinstance(p, list) else "prompt": p,
                            "box_threshold": 0.3,
                        },
                    )
                    for path, p in cases
                ]
            )

    try:
        answers = asyncio.run(scenario())
    finally:
        app.state.batcher.stop()
    for (path, prompt), answer in zip(cases, answers):
        assert answer.json() == expected(fast_model, path, prompt, 0.3)
    stats = app.state.batcher.stats
    assert stats.requests == 4 and stats.largest_group > 1
    assert stats.images_encoded < 4  # the same upload is encoded once per group


def test_run_group_keeps_one_failure_to_its_request(fast_model, data_dir):
    good = Job(Image.open(data_dir / "chelsea.png"), "a", PROMPT, 0.35, 0.25)
    bad = Job(Image.open(data_dir / "chelsea.png"), "a", "", 0.35, 0.25)  # an empty prompt
    assert run_group(fast_model, [bad, good]) == 1
    assert good.future.result() is not None
    with pytest.raises(ValueError):
        bad.future.result()


def test_batcher_bounds():
    batcher = Batcher(model=None, max_queue=1)
    with batcher.reserve(), pytest.raises(QueueFull), batcher.reserve():
        pass
    with batcher.reserve():
        pass
    with pytest.raises(ValueError):
        Batcher(model=None, max_queue=0)


# --------------------------------------------------------------------------- bounded work, disconnects, shutdown


def _cjk_labels(n: int, chars: int = 1) -> list[str]:
    """``n`` distinct labels of ``chars`` CJK characters (one token each for BERT)."""
    return ["".join(chr(0x4E00 + (i * chars + j) % 20000) for j in range(chars)) for i in range(n)]


def test_a_huge_label_list_is_refused_at_once(client):
    body = {"image": base64.b64encode(png()).decode(), "labels": ["a"] * 65_536}
    start = time.monotonic()
    refused = client.post("/v1/detect", json=body)
    assert_error(refused, 413, "too_many_labels")
    assert time.monotonic() - start < 5, "counted before tokenising"
    assert "2000" in refused.json()["detail"] and "--max-labels" in refused.json()["detail"]
    csv = post(client, png(), labels=",".join(f"l{i}" for i in range(2001)))  # the comma-separated form too
    assert_error(csv, 413, "too_many_labels")
    assert_error(post(client, png(), prompt="x" * 5000), 413, "prompt_too_long")


def test_labels_as_repeated_fields_up_to_max_labels(fast_model, data_dir):
    """Each label its own form field: up to --max-labels answer, past it 413 too_many_labels (not the parser's 400)."""
    image = data_dir / "coffee.png"
    labels = _cjk_labels(100)  # one chunk
    with TestClient(create_app(fast_model, Settings(max_labels=100)), raise_server_exceptions=False) as c:
        fields = {"labels": labels, "box_threshold": "0.3", "text_threshold": "0.2"}
        answer = c.post("/v1/detect", files={"image": ("coffee.png", image.read_bytes())}, data=fields)
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected(fast_model, image, labels, 0.3, 0.2)
        for n in (101, 103, 104, 5000):  # 101, 103: read, then counted; 104, 5000: past the parser's 100 + 3 fields
            refused = assert_error(post(c, png(), labels=_cjk_labels(n)), 413, "too_many_labels")
            assert "100" in refused["detail"] and "--max-labels" in refused["detail"], refused
        long_field = assert_error(post(c, png(), prompt="x" * 300_000), 413, "prompt_too_long")  # past max_part_size
        assert "--max-prompt-chars" in long_field["detail"], long_field
    # the defaults: 2000 fields of 32 characters (192 kB of UTF-8) next to an image at the upload limit are read
    # whole and counted (max_chunks=1 then refuses them before tokenising); 2001 are too many labels
    settings = Settings(max_upload_bytes=len(png()), max_chunks=1)
    assert Settings().max_labels == 2000
    with TestClient(create_app(fast_model, settings), raise_server_exceptions=False) as c:
        assert_error(post(c, png(), labels=_cjk_labels(2000, chars=32)), 413, "too_many_chunks")
        assert_error(post(c, png(), labels=_cjk_labels(2001, chars=32)), 413, "too_many_labels")
        as_json = {"image": base64.b64encode(png()).decode(), "labels": _cjk_labels(2000, chars=32)}
        assert_error(c.post("/v1/detect", json=as_json), 413, "too_many_chunks")  # the JSON body's room too


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_label_chunks_are_bounded_and_tokenised_off_the_event_loop(fast_model):
    """10,000 two-character labels need ~119 chunks: tokenising them takes seconds, in a thread."""
    app = create_app(fast_model, Settings(max_labels=20_000, max_chunks=100))
    body = {"image": base64.b64encode(png()).decode(), "labels": _cjk_labels(10_000, chars=2)}

    async def scenario():
        async with _asgi_client(app) as c:
            big = asyncio.create_task(c.post("/v1/detect", json=body))
            waits = []
            while not big.done():
                start = time.monotonic()
                assert (await c.get("/healthz")).status_code == 200
                waits.append(time.monotonic() - start)
                await asyncio.sleep(0.05)
            return await big, waits

    try:
        refused, waits = asyncio.run(scenario())
    finally:
        app.state.batcher.stop()
    body = assert_error(refused, 413, "too_many_chunks")
    assert "--max-chunks" in body["detail"] and "100" in body["detail"]
    assert len(waits) >= 3 and max(waits) < 1.0, waits  # /healthz answered while the labels were tokenised
    assert app.state.batcher.stats.requests == 0  # nothing reached the model


def test_chunks_within_the_limit_run(fast_model, data_dir):
    labels = _cjk_labels(300)  # 3 chunks
    app = create_app(fast_model, Settings(max_chunks=3))
    with TestClient(app) as c:
        answer = post(c, data_dir / "coffee.png", "coffee.png", labels=",".join(labels))
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected(fast_model, data_dir / "coffee.png", labels)
    with TestClient(create_app(fast_model, Settings(max_chunks=2))) as c:
        assert_error(post(c, data_dir / "coffee.png", labels=",".join(labels)), 413, "too_many_chunks")


def _raw_request(base: str, fields: dict, image: bytes) -> tuple[socket.socket, bytes]:
    """An open connection that has sent a whole multipart detect request (not yet answered)."""
    request = httpx.Request("POST", base + "/v1/detect", files={"image": ("i.png", image)}, data=fields)
    body = request.read()
    url = urlparse(base)
    head = (
        f"POST /v1/detect HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: {request.headers['content-type']}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(head + body)
    return sock, body


def _read_status(sock: socket.socket) -> int:
    sock.settimeout(60)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_gone_clients_queued_job_is_not_run(fast_model):
    app = create_app(fast_model)
    batcher = app.state.batcher
    batcher.poll_seconds = 0.05
    started, release, prompts = threading.Event(), threading.Event(), []

    def slow_detect(features, prompt, **kwargs):
        prompts.append(prompt)
        started.set()
        release.wait(30)
        return fast_model.detect(features, prompt, **kwargs)

    batcher.model = type(
        "Slow", (), {"detect": staticmethod(slow_detect), "encode_image": staticmethod(fast_model.encode_image)}
    )()
    try:
        with serve_in_thread(app) as base:
            first, _ = _raw_request(base, {"prompt": "a cat."}, png())
            assert started.wait(30)
            second, _ = _raw_request(base, {"prompt": "a dog."}, png())
            _wait_until(lambda: batcher.pending == 2)
            second.close()  # the client gives up while its job waits
            _wait_until(lambda: batcher.stats.dropped == 1)
            release.set()
            assert _read_status(first) == 200
            first.close()
            health = httpx.get(base + "/healthz").json()
    finally:
        release.set()
    assert prompts == ["a cat."]  # the dropped job never reached the model
    assert health["batches"]["dropped"] == 1 and health["queue"]["pending"] == 0


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_shutdown_is_bounded_with_long_jobs_queued(fast_model, monkeypatch):
    """Two label lists of ~24 chunks each (0.3 s per chunk here) queued; stopping takes about one chunk."""
    passes = fast_model.detect_features

    def slow_pass(*args, **kwargs):
        time.sleep(0.3)
        return passes(*args, **kwargs)

    monkeypatch.setattr(fast_model, "detect_features", slow_pass)
    app = create_app(fast_model, Settings(max_labels=5000, max_chunks=100, shutdown_seconds=30))
    batcher = app.state.batcher
    answers: list[httpx.Response] = []
    labels = ",".join(_cjk_labels(3000))

    def ask(base: str) -> None:
        answers.append(
            httpx.post(base + "/v1/detect", files={"image": ("i.png", png())}, data={"labels": labels}, timeout=120)
        )

    with serve_in_thread(app) as base:
        clients = [threading.Thread(target=ask, args=(base,)) for _ in range(2)]
        for thread in clients:
            thread.start()
        _wait_until(lambda: batcher.pending == 2 and batcher.stats.groups >= 1, timeout=60)
        time.sleep(0.5)  # the first job is inside its chunks
        start = time.monotonic()
    elapsed = time.monotonic() - start
    for thread in clients:
        thread.join(30)
    assert elapsed < 5, f"shutting down took {elapsed:.1f} s"
    assert len(answers) == 2
    for answer in answers:
        assert_error(answer, 503, "shutting_down")


def _asgi_call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], messages: list[dict]) -> list[dict]:
    """Runs one request through the ASGI app with the given receive messages; returns what it sent."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("kind", ["multipart", "json"])
def test_a_client_gone_mid_upload_is_one_log_line(fast_model, caplog, kind):
    app = create_app(fast_model)
    if kind == "multipart":
        content_type = b"multipart/form-data; boundary=xyz"
        part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + png()[:40]
    else:
        content_type, part = b"application/json", b'{"prompt": "a cat.", "image": "iVBORw0KGgo'
    headers = [(b"content-type", content_type), (b"content-length", b"100000")]
    messages = [{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}]
    with caplog.at_level(logging.DEBUG):
        _asgi_call(app, "POST", "/v1/detect", headers, messages)  # raises nothing
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], caplog.text
    lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO, caplog.text


# --------------------------------------------------------------------------- HEAD, headers, health, docs


def test_head_answers_like_get_without_a_body(client):
    for path in ("/", "/healthz", "/docs", "/openapi.json", "/favicon.ico", "/docs/assets/swagger-ui-bundle.js"):
        get, head = client.get(path), client.head(path)
        assert get.status_code == 200 and head.status_code == 200, (path, head.status_code)
        assert head.content == b"" and get.content, path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert client.head("/v1/detect").status_code == 405  # POST only, as GET


def test_every_answer_says_nosniff(client, fast_model, data_dir):
    answers = [
        client.get(p)
        for p in (
            "/",
            "/healthz",
            "/docs",
            "/openapi.json",
            "/favicon.ico",
            "/nowhere",
            "/v1/detect",
            "/docs/assets/swagger-ui.css",
        )
    ]
    answers += [
        post(client, data_dir / "coffee.png", prompt="a cup."),
        post(client, b"junk", prompt="a cup."),
        post(client, png(), prompt=""),
        client.post("/v1/detect", content=b"x"),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 200, 404, 405, 200, 200, 400, 422, 415]
    for answer in answers:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.request.url
    app = create_app(fast_model)
    app.state.batcher.model = None  # a bug: a 500 says nosniff too
    with TestClient(app, raise_server_exceptions=False) as broken:
        answer = post(broken, data_dir / "chelsea.png", prompt="a cat.")
        assert answer.status_code == 500 and answer.headers["x-content-type-options"] == "nosniff"


def test_healthz_shows_the_model_path_only_with_the_key(fast_model):
    app = create_app(fast_model, Settings(api_key="s3cret"), model_name="/secret/path/model.pth")
    with TestClient(app) as locked:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            health = locked.get("/healthz", headers=headers).json()
            assert health["status"] == "ok" and "queue" in health and "model" not in health
            assert "/secret" not in json.dumps(health)
        for headers in ({"X-API-Key": "s3cret"}, {"Authorization": "Bearer s3cret"}):
            assert locked.get("/healthz", headers=headers).json()["model"] == "/secret/path/model.pth"
    with TestClient(create_app(fast_model, model_name="/open/model.pth")) as open_:  # no key: the API is open anyway
        assert open_.get("/healthz").json()["model"] == "/open/model.pth"


def test_docs_load_nothing_from_elsewhere(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets) and any(a.endswith(".css") for a in assets)
    for asset in assets:
        answer = client.get(asset)
        assert answer.status_code == 200 and len(answer.content) > 100, asset
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text


@pytest.mark.slow  # a real gdino serve process and two requests of ~150 passes each
def test_sigterm_stops_gdino_serve_while_long_label_lists_are_queued(fast_dir, tmp_path):
    """The real ``gdino serve``: two requests of ~150 passes each, then SIGTERM; it exits within seconds."""
    import os
    import signal
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-c",
        "import sys; from gdino.apps.cli import main; sys.exit(main())",
        "serve",
        "--model",
        str(fast_dir),
        "--port",
        str(port),
        "--max-chunks",
        "1000",
        "--threads",
        "1",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        _wait_until(lambda: _healthy(base), timeout=120)
        # 300 distinct labels of 100 characters (the last one unique to the label): 2 a chunk
        labels = [
            "".join(chr(0x4E00 + (i * 100 + j) % 20000) for j in range(99)) + chr(0x4E00 + 20000 + i)
            for i in range(300)
        ]
        assert len(set(labels)) == len(labels)
        answers: list[int] = []

        def ask() -> None:
            answer = httpx.post(
                base + "/v1/detect", json={"image": base64.b64encode(png()).decode(), "labels": labels}, timeout=300
            )
            answers.append(answer.status_code)

        clients = [threading.Thread(target=ask) for _ in range(2)]
        for thread in clients:
            thread.start()
        _wait_until(lambda: httpx.get(base + "/healthz").json()["queue"]["pending"] == 2, timeout=60)
        time.sleep(1.0)  # the first is inside its passes, the second queued
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        elapsed = time.monotonic() - start
        for thread in clients:
            thread.join(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = server.stdout.read().decode()
    assert server.returncode in (0, -signal.SIGTERM), log  # uvicorn re-raises the signal once it has shut down
    assert elapsed < 8, f"SIGTERM took {elapsed:.1f} s\n{log}"
    assert answers == [503, 503], log
    assert "Traceback" not in log, log


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation): gdino serve, whose log this checks
def test_gdino_serve_logs_one_line_for_a_client_gone_mid_upload(fast_dir):
    """The README's promise, in the real ``gdino serve`` log: one line per client gone mid-upload, and it goes on."""
    import os
    import signal
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "import sys; from gdino.apps.cli import main; sys.exit(main())", "serve"]
    command += ["--model", str(fast_dir), "--port", str(port), "--threads", "1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in server.stdout), daemon=True)
    reader.start()

    def gone() -> list[str]:
        return [line for line in list(lines) if "disconnected" in line]

    try:
        _wait_until(lambda: _healthy(base), timeout=120)
        big = png((2000, 1500)) + bytes(2 * 1024 * 1024)  # past the 1 MB the parser keeps in memory
        part = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + big
        json_part = b'{"prompt": "a cat.", "image": "' + base64.b64encode(big)
        for content_type, sent in (("multipart/form-data; boundary=xyz", part), ("application/json", json_part)):
            head = (
                f"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(sent) * 2}\r\n\r\n"
            ).encode()
            before = len(gone())
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(head + sent)  # half the body, then the client goes
            _wait_until(lambda before=before: len(gone()) > before)
            answer = httpx.post(base + "/v1/detect", files={"image": ("i.png", png())}, data={"prompt": "a cat."})
            assert answer.status_code == 200, answer.text  # still serving
        time.sleep(0.5)  # room for a second line, were there one
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        reader.join(10)
    log = "".join(lines)
    assert len(gone()) == 2, log
    for line in gone():
        assert line.startswith("INFO:") and "POST /v1/detect" in line, log
    assert "Traceback" not in log and "ERROR" not in log, log


def _healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_request_without_thresholds_gets_the_models_own(data_dir):
    """gdino-shapes recommends 0.25 (its config.json): a request that gives no threshold uses it, as
    detect() does, and /healthz tells the page which values to start from."""
    from gdino import GroundingDinoForObjectDetection

    shapes = GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").eval()
    image = ROOT / "examples" / "shapes.png"
    labels = "red circle,green square,red triangle,orange triangle,yellow circle"
    with TestClient(create_app(shapes)) as c:
        assert c.get("/healthz").json()["defaults"] == {"box_threshold": 0.25, "text_threshold": 0.25}
        answer = post(c, image, name="shapes.png", prompt=labels)
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected(shapes, image, labels.split(","), 0.25, 0.25, name="shapes.png")
        stricter = post(c, image, name="shapes.png", prompt=labels, box_threshold="0.35").json()
        assert len(stricter["detections"]) < len(answer.json()["detections"])
