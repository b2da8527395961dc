"""Load test of ``gdino serve``: many concurrent clients against a real server, answers checked.

Starts ``gdino serve`` (uvicorn) on 127.0.0.1 in a subprocess, sends ``--requests`` detection
requests from ``--concurrency`` client threads (multipart and JSON, several images, prompts and
label lists), and checks that no answer is a 5xx and that every answer equals ``detect()`` run
directly on the same model. Prints p50/p95 latency and throughput.

    python bench/load_server.py                      # the small random-weight test model
    python bench/load_server.py --model DIR_OR_ID    # any checkpoint

Without ``--model`` it builds the small random-weight test checkpoint (``tests/reference.py``,
needs transformers) with its images resized to 160 pixels, so the run measures the server
(queueing, batching, decoding, JSON) more than the network.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = [ROOT / "tests" / "data" / name for name in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
PROMPTS = ["a cat. a remote control.", ["cup", "table", "person"], "a rocket. the sky.", "cat,dog"]
THRESHOLDS = [(0.35, 0.25), (0.3, 0.2)]


@dataclass(frozen=True)
class Case:
    """One request: image, prompt (a string or labels), thresholds and how it is sent."""

    image: Path
    prompt: str | tuple[str, ...]
    box_threshold: float
    text_threshold: float
    as_json: bool


@dataclass
class Report:
    requests: int
    concurrency: int
    seconds: float
    latencies: list[float]
    statuses: dict[int, int]
    wrong: list[str]
    server: dict

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.latencies, n=20, method="inclusive")[18]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def summary(self) -> str:
        return (
            f"{self.requests} requests, {self.concurrency} concurrent clients: statuses {self.statuses}, "
            f"{len(self.wrong)} wrong answers; latency p50 {self.p50 * 1000:.0f} ms, p95 {self.p95 * 1000:.0f} ms; "
            f"throughput {self.throughput:.1f} requests/s; batches {self.server.get('batches')}"
        )


def cases(n: int) -> list[Case]:
    """``n`` requests cycling over images, prompts, thresholds and the two encodings."""
    out = []
    for i in range(n):
        prompt = PROMPTS[(i // len(IMAGES)) % len(PROMPTS)]
        out.append(
            Case(
                image=IMAGES[i % len(IMAGES)],
                prompt=tuple(prompt) if isinstance(prompt, list) else prompt,
                box_threshold=THRESHOLDS[i % 2][0],
                text_threshold=THRESHOLDS[i % 2][1],
                as_json=i % 3 == 0,
            )
        )
    return out


def expected_answers(model, all_cases: list[Case]) -> dict[Case, dict]:
    """What ``detect()`` gives for each distinct case, as the server's JSON."""
    from gdino.processing.prompts import prompt_from_text

    answers = {}
    for case in dict.fromkeys(c for c in all_cases):
        prompt = list(case.prompt) if isinstance(case.prompt, tuple) else prompt_from_text(case.prompt)
        found = model.detect(case.image, prompt, case.box_threshold, case.text_threshold)
        width, height = found.image_size
        answers[case] = {"image": case.image.name, "width": width, "height": height, "detections": found.to_list()}
    return answers


def send(client, url: str, case: Case) -> tuple[int, dict | None, float]:
    """One request; returns status, JSON answer and seconds."""
    data = case.image.read_bytes()
    thresholds = {"box_threshold": case.box_threshold, "text_threshold": case.text_threshold}
    key = "labels" if isinstance(case.prompt, tuple) else "prompt"
    value = list(case.prompt) if isinstance(case.prompt, tuple) else case.prompt
    start = time.perf_counter()
    if case.as_json:
        body = {"image": base64.b64encode(data).decode(), "name": case.image.name, key: value, **thresholds}
        response = client.post(url + "/v1/detect", json=body)
    else:
        files = {"image": (case.image.name, data, "application/octet-stream")}
        response = client.post(url + "/v1/detect", files=files, data={key: value, **thresholds})
    elapsed = time.perf_counter() - start
    try:
        answer = response.json()
    except ValueError:
        answer = None
    return response.status_code, answer, elapsed


def run_load(
    url: str, all_cases: list[Case], expected: dict[Case, dict], concurrency: int, api_key: str | None
) -> Report:
    """Sends every case from ``concurrency`` threads, each with its own keep-alive connection."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    clients = [httpx.Client(headers=headers, timeout=120) for _ in range(concurrency)]

    def work(i: int) -> tuple[int, dict | None, float]:
        return send(clients[i % concurrency], url, all_cases[i])

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(work, range(len(all_cases))))
        seconds = time.perf_counter() - start
        server = clients[0].get(url + "/healthz").json()
    finally:
        for client in clients:
            client.close()
    statuses: dict[int, int] = {}
    wrong = []
    for i, (status, answer, _) in enumerate(results):
        statuses[status] = statuses.get(status, 0) + 1
        if status != 200 or answer != expected[all_cases[i]]:
            wrong.append(f"request {i} ({all_cases[i]}): status {status}, {json.dumps(answer)[:300]}")
    return Report(len(all_cases), concurrency, seconds, [r[2] for r in results], statuses, wrong, server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``gdino serve`` in a subprocess on 127.0.0.1 (a context manager yielding its URL)."""

    def __init__(self, model: str | Path, threads: int, api_key: str | None = None, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "gdino",
            "serve",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            *extra,
        ]
        self.env = {k: v for k, v in os.environ.items() if k != "GDINO_API_KEY"}
        if api_key:
            self.env["GDINO_API_KEY"] = api_key
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (the server's log lives until __exit__ closes it)

    def __enter__(self) -> str:
        import httpx

        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gdino serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"gdino serve did not answer within 120 s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def fast_copy(model_dir: Path, out: Path, shortest_edge: int = 160, longest_edge: int = 256) -> Path:
    """A copy of a Hugging Face model directory whose processor resizes images to ``shortest_edge``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name in ("processor_config.json", "preprocessor_config.json"):
            config = json.loads(f.read_text())
            settings = config.get("image_processor", config)
            settings["size"] = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
            (out / f.name).write_text(json.dumps(config))
        elif not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    return out


def _small_model(directory: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from reference import build_reference, save_reference, small_reference_config

    with torch.no_grad():
        save_reference(build_reference(small_reference_config(), seed=1), directory / "small")
    return fast_copy(directory / "small", directory / "small-160")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the small random-weight test model, 160-pixel images)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of the check)")
    parser.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (1: no grouping)")
    args = parser.parse_args()

    import torch

    from gdino import GroundingDinoForObjectDetection

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or _small_model(Path(tmp))
        model = GroundingDinoForObjectDetection.from_pretrained(model_path).eval()
        all_cases = cases(args.requests)
        expected = expected_answers(model, all_cases)
        key = secrets.token_urlsafe(16)
        with ServerProcess(model_path, args.threads, key, "--max-batch", str(args.max_batch)) as url:
            report = run_load(url, all_cases, expected, args.concurrency, key)
    print(report.summary())
    for line in report.wrong[:10]:
        print("  ", line)
    return 0 if not report.wrong else 1


if __name__ == "__main__":
    sys.exit(main())
