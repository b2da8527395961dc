"""``gdino track --masks`` with the packaged gdino-shapes and gdino-shapes-sam: each tracked box's
mask as COCO RLE where it is a detection of the frame and null where the track coasts (frames
between strides: tests/inference/test_video_tracking_masks.py), the journal's masks replayed to the
same bytes without segmenting again, and a segmenter that cannot be used refused before any frame
is decoded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

av = pytest.importorskip("av")
pytest.importorskip("scipy")
mask_utils = pytest.importorskip("pycocotools.mask")

from gdino.apps.cli import main
from gdino.inference.segmenter import Segmenter
from gdino.processing.video import VideoReader
from gdino.training.shapes_video import VideoSettings, video_pairs, write_shapes_video

SEED = 21
SETTINGS = VideoSettings(frames=8)
FILES = ("tracks.jsonl", "annotations.xml", "annotated.mp4", ".gdino-track.jsonl")
MASKS = ("--masks", "gdino-shapes-sam", "--annotate")


def _track(video: str | Path, out: Path, *extra: str) -> int:
    args = ["track", str(video), "--classes", ",".join(video_pairs(SEED, SETTINGS)), "--out", str(out)]
    return main([*args, "--model", "gdino-shapes", "--device", "cpu", "--threads", "1", "--batch-size", "2", *extra])


def _outputs(out: Path) -> dict[str, bytes]:
    found = {name: (out / name).read_bytes() for name in FILES}
    return found | {f"mot/{p.name}": p.read_bytes() for p in sorted((out / "mot").iterdir())}


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "tracks.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "shapes.mp4"
    write_shapes_video(path, SEED, SETTINGS)
    return path


@pytest.fixture(scope="module")
def masked(video: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("track") / "out"
    assert _track(video, out, *MASKS) == 0
    return out


@pytest.mark.slow  # two models on 8 frames
def test_each_detected_box_has_its_detections_mask(masked: Path) -> None:
    records = _records(masked)
    journal = [json.loads(line) for line in (masked / ".gdino-track.jsonl").read_text().splitlines()]
    assert journal[0]["masks"] == "gdino-shapes-sam"
    assert [r["detected"] for r in records] == [True] * SETTINGS.frames
    masked_objects, covered = 0, 0
    for record, found in zip(records, journal[1:]):
        assert len(found["masks"]) == len(found["boxes"]) == len(found["mask_scores"])
        by_box = {tuple(round(v, 2) for v in box): k for k, box in enumerate(found["boxes"])}
        for d in record["detections"]:
            k = by_box.get(tuple(d["box"]))
            if k is None:  # a track coasting at its predicted box: no detection, no mask
                assert d["mask"] is None and d["mask_score"] is None
                continue
            masked_objects += 1
            assert d["mask"] == found["masks"][k] and d["mask_score"] == round(found["mask_scores"][k], 4)
            assert d["mask"]["size"] == [SETTINGS.size[1], SETTINGS.size[0]] and 0 <= d["mask_score"] <= 1
            mask = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})  # (H, W)
            x0, y0, x1, y1 = (round(v) for v in d["box"])
            covered += int(mask[y0:y1, x0:x1].sum() > 0)  # (the shapes segmenter's masks are rough, not empty)
    assert masked_objects >= SETTINGS.frames and covered == masked_objects
    with av.open(str(masked / "annotated.mp4")) as annotated:
        assert sum(1 for _ in annotated.decode(video=0)) == SETTINGS.frames


@pytest.mark.slow  # two models on 8 frames, then a replay
def test_resume_with_masks_replays_them_without_segmenting(
    video: Path, masked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    journal = (masked / ".gdino-track.jsonl").read_text().splitlines(keepends=True)
    (out / ".gdino-track.jsonl").write_text("".join(journal[:6]) + journal[6][:40])  # 5 frames and a cut line
    calls: list[int] = []
    segment = Segmenter.segment

    def counted(self: Segmenter, image: np.ndarray, boxes: np.ndarray) -> Any:
        calls.append(len(boxes))
        return segment(self, image, boxes)

    monkeypatch.setattr(Segmenter, "segment", counted)
    assert _track(video, out, *MASKS) == 0
    assert len(calls) == 3  # frames 5-7 left, each segmented once
    assert _outputs(out) == _outputs(masked)


def test_a_segmenter_that_cannot_be_loaded_is_one_line_before_any_frame(
    video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_frames(self: VideoReader) -> Any:
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(VideoReader, "frames", no_frames)
    out = tmp_path / "out"
    assert _track(video, out, "--masks", str(tmp_path / "no-such-segmenter")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gdino: ") and "--masks" in err[0] and "no-such-segmenter" in err[0]
    assert not (out / ".gdino-track.jsonl").exists() and not (out / "tracks.jsonl").exists()
    assert _track(video, out, "--masks", "gdino-shapes") == 2  # a detector is no segmenter
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--masks gdino-shapes" in err[0]


def test_masks_without_pycocotools_says_what_to_install(
    video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else find_spec(name, *a)
    )
    assert _track(video, tmp_path / "out", "--masks", "gdino-shapes-sam") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'gdino[masks]'" in err[0]


def test_resuming_with_other_masks_is_refused(
    video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    settings = {"gdino_track": 1, "video": str(video.resolve()), "model": "gdino-shapes", "dtype": "fp32"}
    settings |= {"names": list(video_pairs(SEED, SETTINGS)), "prompt": None, "low_threshold": 0.1, "nms": 0.5}
    (out / ".gdino-track.jsonl").write_text(json.dumps(settings | {"stride": 1}) + "\n")  # a run without masks
    before = (out / ".gdino-track.jsonl").read_bytes()
    assert _track(video, out, "--masks", "gdino-shapes-sam") == 2
    err = capsys.readouterr().err
    assert "holds a run with other masks;" in err
    assert (out / ".gdino-track.jsonl").read_bytes() == before
    (out / ".gdino-track.jsonl").write_text(json.dumps(settings | {"stride": 1, "masks": "gdino-shapes-sam"}) + "\n")
    assert _track(video, out) == 2  # and the other way round
    assert "holds a run with other masks;" in capsys.readouterr().err
