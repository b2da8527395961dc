"""``gdino track`` really killed: a run in a subprocess gets SIGKILL once its journal holds some of the
video's frames but not all, is started again with the same arguments, and every output (JSON Lines,
MOT files, CVAT XML, the annotated video, the journal) is byte-identical to an uninterrupted run's;
with ``--masks`` too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("scipy")

from gdino.training.shapes_video import VideoSettings, video_pairs, write_shapes_video

SEED = 21
SETTINGS = VideoSettings(frames=30)  # 3 s of video at 10 frames/s
JOURNAL = ".gdino-track.jsonl"
KILL_AFTER = 8  # frames journaled before the kill
TIMEOUT = 300.0


def _command(video: Path, out: Path, extra: tuple[str, ...]) -> list[str]:
    command = [sys.executable, "-m", "gdino", "track", str(video), "--out", str(out), "--annotate"]
    command += ["--classes", ",".join(video_pairs(SEED, SETTINGS)), "--model", "gdino-shapes"]
    return [*command, "--device", "cpu", "--threads", "1", "--batch-size", "2", *extra]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr


def _journaled(out: Path) -> int:
    """Complete frame lines in the journal (its header not counted)."""
    try:
        return max(0, (out / JOURNAL).read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _kill_midway(command: list[str], out: Path) -> int:
    """Starts ``command``, SIGKILLs it once ``KILL_AFTER`` frames are journaled; the frames journaled then."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while _journaled(out) < KILL_AFTER:
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()!r}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no frames journaled in time"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()  # already dead but for a failed assertion above
        process.wait()
        assert process.stderr is not None
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return _journaled(out)


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    write_shapes_video(path, SEED, SETTINGS)
    return path


@pytest.mark.slow  # three runs of a subprocess on 30 frames each
@pytest.mark.parametrize("extra", [(), ("--masks", "gdino-shapes-sam")], ids=["boxes", "masks"])
def test_killed_and_started_again_gives_the_same_bytes(video: Path, tmp_path: Path, extra: tuple[str, ...]) -> None:
    whole = tmp_path / "whole"
    _run(_command(video, whole, extra))
    outputs = _outputs(whole)
    expected = {JOURNAL, "tracks.jsonl", "annotations.xml", "annotated.mp4"}
    assert expected <= set(outputs) and any(name.startswith("mot/") for name in outputs)
    assert outputs["tracks.jsonl"].count(b"\n") == SETTINGS.frames
    assert (b'"mask": {"size"' in outputs["tracks.jsonl"]) == bool(extra)

    killed = tmp_path / "killed"
    command = _command(video, killed, extra)
    journaled = _kill_midway(command, killed)
    assert KILL_AFTER <= journaled < SETTINGS.frames  # killed part way: some frames done, not all
    assert _outputs(killed) != outputs
    _run(command)  # the same arguments again: it resumes
    assert _outputs(killed) == outputs
