"""``gdino serve`` as the ML backend of a real Label Studio (PyPI's, in .venv-label-studio, made by
scripts/label_studio_venv.sh).

The test starts Label Studio on loopback (a free port, SQLite and its data in tmp_path, a user with a
known legacy token, telemetry off), makes a personal access token through its API, and starts
``gdino serve --model gdino-shapes --masks gdino-shapes-sam`` with that token on another free port.
Through Label Studio's REST API it creates projects with a labelling config, uploads generated shapes
images, connects the backend (``POST /api/ml``), asks for predictions as the data manager's "Retrieve
Predictions" action does, and reads them back: labels and percent boxes equal ``detect``'s on the same
files (the config's ``predicted_values`` included), and with ``BrushLabels`` the brush masks equal the
segmenter's. The server fetched the uploads from Label Studio with the token (a JWT: exchanged for a
Bearer access token). Label Studio's first start runs its migrations (about 55 s on an idle 2-core
machine); the logs of both servers are in tmp_path and shown when a start fails.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from brush_rle import decode_brush_rle
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.segmenter import Segmenter
from gdino.training.shapes import ShapesSettings, render

ROOT = Path(__file__).parents[2]
LABEL_STUDIO = ROOT / ".venv-label-studio" / "bin" / "label-studio"
TOKEN = "gdino-e2e-legacy-token"
LABELS = '<Label value="orange star"/><Label value="purple square"/><Label value="RT" predicted_values="red triangle"/>'
PROMPTS = ["orange star", "purple square", "RT", "red triangle"]
VALUES = ["orange star", "purple square", "RT", "RT"]
IMAGE = '<Image name="image" value="$image"/>'
BOXES = f'<RectangleLabels name="label" toName="image">{LABELS}</RectangleLabels>'
BRUSH = '<BrushLabels name="paint" toName="image"><Label value="orange star"/></BrushLabels>'

pytestmark = [
    pytest.mark.slow,  # Label Studio's start (its migrations), and gdino serve loading two models
    pytest.mark.skipif(not LABEL_STUDIO.exists(), reason="no .venv-label-studio: bash scripts/label_studio_venv.sh"),
    pytest.mark.skipif(sys.platform == "win32", reason="process groups"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as answer:
        return json.loads(answer.read())


@contextmanager
def started(command: list[str], env: dict[str, str], log: Path, health: str, seconds: float) -> Iterator[float]:
    """Runs ``command`` until the block ends; yields the seconds it took to answer ``health``."""
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    begun = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited ({process.returncode}):\n{log.read_text()[-4000:]}")
            if time.monotonic() - begun > seconds:
                pytest.fail(f"{command[0]} did not answer {health} in {seconds} s:\n{log.read_text()[-4000:]}")
            try:
                get(health, timeout=2)
                break
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.5)
        yield time.monotonic() - begun
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


class LabelStudio:
    """Label Studio's REST API with the legacy token."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None, files: dict[str, bytes] | None = None) -> Any:
        headers = {"Authorization": f"Token {TOKEN}"}
        data = None
        if files is not None:
            boundary = uuid.uuid4().hex
            parts = [
                f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"; filename="{n}"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + content
                + b"\r\n"
                for n, content in files.items()
            ]
            data = b"".join(parts) + f"--{boundary}--\r\n".encode()
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=300) as answer:
                text = answer.read()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Label Studio {method} {path}: {exc.code} {exc.read()[:2000]!r}")
        return json.loads(text) if text else None


def png(seed: int) -> bytes:
    scene = render(np.random.default_rng(seed), list(range(24)), ShapesSettings(grain=0.0, backgrounds=("flat",)))
    out = io.BytesIO()
    Image.fromarray(scene.image).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {f"shape{seed}.png": png(seed) for seed in (1, 2, 4)}


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory) -> Iterator[LabelStudio]:
    folder = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "HOME": str(folder),  # nothing of the user's is read or written
        "LABEL_STUDIO_BASE_DATA_DIR": str(folder / "data"),
        "ML_BLOCK_LOCAL_IP": "false",  # the backend is on loopback; Label Studio blocks that by default
        "USE_DEFAULT_BANNED_SUBNETS": "false",  # ... also for the webhook it makes for the backend
        "SENTRY_DSN": "",  # no error reports, usage data or version checks leave the machine
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
    }
    command = [str(LABEL_STUDIO), "start", "--no-browser", "--data-dir", str(folder / "data")]
    command += ["--internal-host", "127.0.0.1", "-p", str(port), "--username", "gdino@example.com"]
    command += ["--password", "gdino-e2e-password", "--user-token", TOKEN, "--enable-legacy-api-token"]
    url = f"http://127.0.0.1:{port}"
    with started(command, env, folder / "label-studio.log", url + "/health", 600) as seconds:
        print(f"Label Studio's first start (migrations): {seconds:.0f} s")
        yield LabelStudio(url)


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("gdino-serve")
    personal = label_studio.call("POST", "/api/token/")["token"]  # a JWT refresh token
    port = free_port()
    command = [sys.executable, "-m", "gdino", "serve", "--model", "gdino-shapes", "--masks", "gdino-shapes-sam"]
    command += ["--port", str(port), "--threads", str(torch.get_num_threads())]
    command += ["--label-studio-url", label_studio.url, "--label-studio-api-key", personal]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}/label-studio"
    with started(command, env, folder / "gdino-serve.log", url + "/health", 300):
        yield url


def predictions(label_studio: LabelStudio, backend: str, config: str, files: dict[str, bytes]) -> dict[str, list]:
    """Each uploaded file's prediction results, made by Label Studio's own calls to the backend."""
    project = label_studio.call("POST", "/api/projects/", {"title": "gdino e2e", "label_config": config})["id"]
    label_studio.call("POST", f"/api/projects/{project}/import", files=files)
    connected = label_studio.call("POST", "/api/ml", {"url": backend, "project": project, "title": "gdino"})
    assert connected["readable_state"] == "Connected", connected
    selected = {"selectedItems": {"all": True, "excluded": []}}
    done = label_studio.call("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}", selected)
    assert done["processed_items"] == len(files), done
    tasks = label_studio.call("GET", f"/api/tasks?project={project}")["tasks"]
    out = {}
    for task in tasks:
        stored = label_studio.call("GET", f"/api/predictions?task={task['id']}")
        assert len(stored) == 1 and stored[0]["model_version"] == "gdino-0.1.0-gdino-shapes+gdino-shapes-sam"
        name = next(n for n in files if task["data"]["image"].endswith("-" + n))  # uploads are "<id>-<name>"
        out[name] = stored[0]["result"]
    assert sorted(out) == sorted(files)
    return out


@pytest.fixture(scope="module")
def shapes_model() -> GroundingDinoForObjectDetection:
    return GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").eval()


def test_label_studio_gets_detects_boxes_in_percent_with_the_configs_labels(
    label_studio, backend, files, shapes_model
) -> None:
    stored = predictions(label_studio, backend, f"<View>{IMAGE}{BOXES}</View>", files)
    aliases = 0
    for name, results in stored.items():
        found = shapes_model.detect(Image.open(io.BytesIO(files[name])), labels=PROMPTS)
        width, height = found.image_size
        assert len(results) == len(found), name
        for result, box, label_id in zip(results, found.boxes, found.label_ids):
            assert (result["from_name"], result["to_name"], result["type"]) == ("label", "image", "rectanglelabels")
            assert (result["original_width"], result["original_height"]) == (width, height)
            assert result["value"]["rectanglelabels"] == [VALUES[int(label_id)]]
            aliases += int(label_id) == 3
            x0, y0, x1, y1 = np.clip(box, 0, [width, height, width, height]).tolist()
            expected = [100 * x0 / width, 100 * y0 / height, 100 * (x1 - x0) / width, 100 * (y1 - y0) / height]
            got = [result["value"][k] for k in ("x", "y", "width", "height")]
            np.testing.assert_allclose(got, expected, atol=1e-3)
    assert aliases > 0, "a box found by a predicted value is stored under its label's value"


def test_label_studio_gets_the_segmenters_masks_as_brush_labels(label_studio, backend, files, shapes_model) -> None:
    stored = predictions(label_studio, backend, f"<View>{IMAGE}{BOXES}{BRUSH}</View>", files)
    segmenter = Segmenter.from_pretrained("gdino-shapes-sam")
    painted = 0
    for name, results in stored.items():
        image = Image.open(io.BytesIO(files[name])).convert("RGB")
        found = segmenter.add_masks(image, shapes_model.detect(image, labels=PROMPTS))
        stars = [i for i in range(len(found)) if VALUES[int(found.label_ids[i])] == "orange star"]
        brushes = [r for r in results if r["type"] == "brushlabels"]
        assert len(brushes) == len(stars) and len(results) == len(found) + len(stars), name
        for result, i in zip(brushes, stars):
            assert result["from_name"] == "paint" and result["value"]["brushlabels"] == ["orange star"]
            decoded = decode_brush_rle(result["value"]["rle"]).reshape(image.height, image.width, 4)[:, :, 3] == 255
            assert np.mean(decoded != found.masks.mask(i)) < 1e-3, "the segmenter's mask, up to rounding"
            painted += 1
    assert painted > 0
