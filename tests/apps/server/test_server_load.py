"""``gdino serve`` as a real process (uvicorn on 127.0.0.1, a free port) under load, small model.

200 requests from 16 concurrent clients (bench/load_server.py, whose numbers are in
bench/README.md): no 5xx, and every answer equals ``detect()`` run directly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install -e '.[serve]'")
import httpx
import torch
from test_server import load_bench

from gdino import GroundingDinoForObjectDetection

THREADS = 1  # torch threads of the server and of the direct check: same kernels, identical answers


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def fast_dir(bench, small_dir, tmp_path_factory):
    return bench.fast_copy(small_dir, tmp_path_factory.mktemp("small-160"))


@pytest.mark.slow  # the load test
def test_load_no_5xx_and_every_answer_right(bench, fast_dir):
    cases = bench.cases(200)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        model = GroundingDinoForObjectDetection.from_pretrained(fast_dir).eval()
        expected = bench.expected_answers(model, cases)
    finally:
        torch.set_num_threads(threads)
    with bench.ServerProcess(fast_dir, THREADS, "load-key") as url:
        refused = httpx.post(url + "/v1/detect", json={"image": "", "prompt": "a cat."})
        assert refused.status_code == 401
        report = bench.run_load(url, cases, expected, concurrency=16, api_key="load-key")
    print(report.summary())
    assert not any(status >= 500 for status in report.statuses), report.summary()
    assert report.wrong == [], "\n".join(report.wrong[:5])
    assert report.server["batches"]["requests"] == 200


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_serve_reports_a_missing_model_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gdino", "serve", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("gdino: error:") and "Traceback" not in done.stderr
