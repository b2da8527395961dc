"""``gdino label --ray ADDRESS`` on a two-node Ray cluster that the tests start on loopback (1 CPU
each): the export is byte for byte the single-process one; a driver killed part-way and started
again skips what was journaled; an actor process killed with SIGKILL is restarted by Ray and
nothing is lost or journaled twice; the unreadable image goes to errors.txt."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_label import CLASSES, THRESHOLD, _tree, gdino, make_photos

RAY = str(Path(sys.executable).with_name("ray"))
JOURNAL = ".gdino-label.jsonl"


def _ray(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([RAY, *args], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory) -> Path:
    """test_label's folder: 30 images in three sub-folders and a broken one."""
    return make_photos(tmp_path_factory.mktemp("photos"), data_dir)


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_without_ray_or_with_workers_alone(photos, tmp_path, monkeypatch):
    from gdino.apps.label_ray import RayMissingError, import_ray

    run = gdino(photos, "--classes", "cat", "--out", tmp_path / "out", "--workers", "2")
    assert run.returncode == 2 and "--workers is the number of Ray actors" in run.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(RayMissingError, match=r"pip install 'gdino\[ray\]'"):
        import_ray()
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A head and a second node, 1 CPU each, on 127.0.0.2 (Ray maps 127.0.0.1 to the public
    address); the address to join. ``ray stop`` at the end, whatever happened."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'gdino[ray]')")
    if not sys.platform.startswith("linux"):
        pytest.skip("the test cluster runs on 127.0.0.2 and finds actors in /proc: Linux only")
    temp = tempfile.mkdtemp(prefix="gdino-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    # A token of its own for the nodes and the drivers (gdino's subprocesses inherit os.environ),
    # whatever ~/.ray/auth_token an earlier local ray.init() left behind.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    node = [
        "--node-ip-address=127.0.0.2",
        "--num-cpus=1",
        "--object-store-memory=100000000",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    try:
        _ray("start", "--head", "--port=0", "--include-dashboard=false", *node, env=env)
        address = (Path(temp) / "ray_current_cluster").read_text().strip()
        _ray("start", f"--address={address}", *node, env=env)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=env, check=False)
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def reference(photos, fast_dir, tmp_path_factory) -> Path:
    """The single-process run, YOLO format, in a process whose default is two threads (the actors'
    is one): ``--threads 1`` in both is what makes the exports byte for byte the same."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run = gdino(photos, "--format", "yolo", "--out", out, "--batch-size", "2", *_common(fast_dir), threads="2")
    assert run.returncode == 0, run.stderr
    return out


def _common(model: Path) -> list[str | Path]:
    return ["--classes", CLASSES, "--model", model, "--box-threshold", THRESHOLD, "--device", "cpu", "--threads", "1"]


def _journaled(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()[1:]]


def _wait_for(run: subprocess.Popen, journal: Path, lines: int) -> None:
    """Until the journal has ``lines`` lines (the header included) or the run ends."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.02)


def _check_complete(out: Path, reference: Path) -> None:
    records = [r for r in _journaled(out) if "error" not in r]
    assert len(records) == 30 and len({r["image"] for r in records}) == 30  # none lost, none twice
    assert (out / "errors.txt").read_text().startswith("part1/broken.jpg\t")
    ours, theirs = _tree(out), _tree(reference)
    assert ours.pop("data.yaml") == theirs.pop("data.yaml").replace(bytes(reference), bytes(out))  # names OUT
    assert ours == theirs


@pytest.mark.slow
def test_same_export_and_driver_killed(cluster, photos, fast_dir, reference, tmp_path):
    out = tmp_path / "out"
    ray = ["--ray", cluster, "--workers", "2", "--format", "yolo", "--out", out, "--batch-size", "2"]
    run = gdino(photos, *ray, *_common(fast_dir), background=True)
    _wait_for(run, out / JOURNAL, 7)  # the header and at least three batches
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = len(_journaled(out))
    assert 6 <= done < 31 and not (out / "data.yaml").exists()

    again = gdino(photos, *ray, *_common(fast_dir))
    assert again.returncode == 0, again.stderr
    resumed = int(again.stderr.split("resuming, ")[1].split(" of 31")[0])
    assert resumed >= done - 1  # the broken image is tried again
    assert "label: Ray, 2 model actor(s)" in again.stderr and "1 could not be read" in again.stderr
    _check_complete(out, reference)


def _actor_pids() -> list[int]:
    """Processes whose title names the detector actor (Ray sets it to ``ray::<actor class>...``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and title.startswith("ray::") and "Detector" in title:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_actor_killed_is_retried(cluster, photos, fast_dir, reference, tmp_path):
    out = tmp_path / "out"
    ray = ["--ray", cluster, "--workers", "2", "--format", "yolo", "--out", out, "--batch-size", "1"]
    run = gdino(photos, *ray, *_common(fast_dir), background=True)
    _wait_for(run, out / JOURNAL, 4)
    pids = _actor_pids()
    assert pids and run.poll() is None, "no actor to kill, or the run is over"
    os.kill(pids[0], signal.SIGKILL)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    assert len(_journaled(out)) == 31  # 30 records and the broken image, each once
    _check_complete(out, reference)


@pytest.mark.slow
def test_tiles_on_ray_give_the_single_process_export(cluster, photos, fast_dir, tmp_path):
    """``--tile`` on Ray: the actors get each image at its own size and tile it as the single-process run
    does; an image smaller than a tile is the same error record in both."""
    tiles = ["--tile", "96", "--batch-size", "1", "--format", "jsonl"]
    single = gdino(photos, *tiles, "--out", tmp_path / "single", *_common(fast_dir), threads="2")
    assert single.returncode == 0, single.stderr
    ray = gdino(photos, *tiles, "--ray", cluster, "--workers", "2", "--out", tmp_path / "ray", *_common(fast_dir))
    assert ray.returncode == 0, ray.stderr
    assert "label: Ray, 2 model actor(s)" in ray.stderr
    ours, theirs = _journaled(tmp_path / "ray"), _journaled(tmp_path / "single")
    by_name = {r["image"]: r for r in theirs}
    assert len(ours) == len(theirs) == 31 and all(by_name[r["image"]] == r for r in ours)
    too_small = [r for r in theirs if "tile size 96 is over" in r.get("error", "")]
    assert 0 < len(too_small) < 30  # some of the 40-140 px images are under a tile
    assert _tree(tmp_path / "ray") == _tree(tmp_path / "single")
