"""``gdino track`` end to end with the packaged gdino-shapes model: all four outputs, resuming from
a journal cut short by a kill gives the same bytes, an undecodable frame is skipped in place,
a pipe on stdin is read, and a file that is not a video is refused before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("scipy")

from gdino.apps.cli import main
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.training.shapes_video import VideoSettings, shapes_video, video_pairs, write_shapes_video

SEED = 21
SETTINGS = VideoSettings(frames=8)
FILES = ("tracks.jsonl", "annotations.xml", "annotated.mp4", ".gdino-track.jsonl")


def _classes() -> str:
    return ",".join(video_pairs(SEED, SETTINGS))


def _track(video: str | Path, out: Path, *extra: str) -> int:
    args = ["track", str(video), "--classes", _classes(), "--out", str(out), "--model", "gdino-shapes"]
    return main([*args, "--device", "cpu", "--threads", "1", "--batch-size", "2", *extra])


def _outputs(out: Path) -> dict[str, bytes]:
    found = {name: (out / name).read_bytes() for name in FILES}
    found |= {f"mot/{p.name}": p.read_bytes() for p in sorted((out / "mot").iterdir())}
    return found


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    write_shapes_video(path, SEED, SETTINGS)
    return path


@pytest.fixture(scope="module")
def finished(video: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("track") / "out"
    assert _track(video, out, "--annotate") == 0
    return out


def test_not_a_video_is_refused_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 20)
    args = ["track", str(text), "--classes", "red circle", "--out", str(tmp_path / "out")]
    assert main([*args, "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a video" in err[0] and "no-such-model" not in err[0]
    assert not (tmp_path / "out").exists()  # nothing made


def test_out_holding_someone_elses_files_is_refused(
    video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "tracks.jsonl").write_text("mine\n")
    assert _track(video, out) == 2
    assert "no gdino track run wrote" in capsys.readouterr().err
    assert (out / "tracks.jsonl").read_text() == "mine\n"
    assert _track(video, video.parent) == 2  # the video's own folder... holds it
    assert "folder above it" in capsys.readouterr().err


@pytest.mark.slow  # the shapes model on 8 frames, twice, on 2 CPU cores
def test_all_outputs_and_resume_after_a_kill_is_byte_identical(
    video: Path, finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [json.loads(line) for line in (finished / "tracks.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(SETTINGS.frames))
    assert sum(len(r["detections"]) for r in records) > 0
    assert all("track_id" in d for r in records for d in r["detections"])
    assert ET.parse(finished / "annotations.xml").getroot().findtext("version") == "1.1"
    with av.open(str(finished / "annotated.mp4")) as annotated:
        assert sum(1 for _ in annotated.decode(video=0)) == SETTINGS.frames
    assert sorted(p.name for p in (finished / "mot").iterdir()) == sorted(
        n.replace(" ", "_") + ".txt" for n in _classes().split(",")
    )
    # killed after 3 frames were journaled, the 4th half written: a journal synced a frame at a time
    out = tmp_path / "out"
    out.mkdir()
    journal = (finished / ".gdino-track.jsonl").read_text().splitlines(keepends=True)
    (out / ".gdino-track.jsonl").write_text("".join(journal[:4]) + journal[4][:25])
    (out / "tracks.jsonl").write_text(journal[1])  # a partial output of the killed run
    calls: list[int] = []
    detect = GroundingDinoForObjectDetection.detect

    def counted(self: GroundingDinoForObjectDetection, images: list[np.ndarray], *a: object, **k: object) -> object:
        calls.append(len(images))
        return detect(self, images, *a, **k)

    monkeypatch.setattr(GroundingDinoForObjectDetection, "detect", counted)
    assert _track(video, out, "--annotate") == 0
    assert sum(calls) == SETTINGS.frames - 3  # the journaled frames were not detected again
    assert _outputs(out) == _outputs(finished)


@pytest.mark.slow  # the shapes model on 8 frames, in a subprocess
def test_a_pipe_on_stdin(tmp_path: Path, finished: Path) -> None:
    piped = tmp_path / "shapes.mkv"  # Matroska streams: it needs no seeking back, as mp4 does
    write_shapes_video(piped, SEED, SETTINGS)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gdino", "track", "-", "--classes", _classes(), "--out", str(out)]
    command += ["--model", "gdino-shapes", "--device", "cpu", "--threads", "1", "--batch-size", "2"]
    with open(piped, "rb") as stdin:
        done = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "tracks.jsonl").read_text().splitlines()]
    assert len(records) == SETTINGS.frames
    assert sum(len(r["detections"]) for r in records) > 0
    assert "frames/s" in done.stderr


@pytest.mark.slow  # the shapes model on 8 frames
def test_an_undecodable_frame_is_skipped_with_its_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.mkv"
    with av.open(str(broken), "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = *SETTINGS.size, "yuvj420p"
        for i, (image, _) in enumerate(shapes_video(SEED, SETTINGS)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                if i == 3:
                    junk = av.Packet(b"\xff\xd8 not a jpeg " * 16)
                    junk.pts, junk.dts, junk.time_base, junk.stream = packet.pts, packet.dts, packet.time_base, stream
                    packet = junk
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    out = tmp_path / "out"
    assert _track(broken, out) == 2  # reported (exit status 2), never fatal: every other frame is there
    assert "frame 3" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "tracks.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(SETTINGS.frames))
    assert records[3]["time"] == pytest.approx(0.3) and "could not be decoded" in records[3]["error"]
    assert records[3]["detected"] is False
    assert sum(len(r["detections"]) for r in records[4:]) > 0
