"""Reading and writing video (gdino.processing.video, video_writer): frames and time stamps, an
undecodable frame reported in its place, a file that is not a video refused, rotation applied."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from gdino.processing.video import VideoError, open_video, upright
from gdino.processing.video_writer import VideoWriter


def _grey(value: int, height: int = 48, width: int = 64) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


def _mjpeg_with_garbage(path: Path, bad: int, frames: int = 6) -> None:
    """A Motion JPEG .mkv (every frame stands alone) whose frame ``bad`` is replaced by garbage bytes."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_grey(40 * i), format="rgb24")):
                if i == bad:
                    junk = av.Packet(b"\xff\xd8 not a jpeg " * 16)
                    junk.pts, junk.dts, junk.time_base, junk.stream = packet.pts, packet.dts, packet.time_base, stream
                    packet = junk
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_frames_come_with_their_time_stamps(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    times = [0.0, 0.1, 0.25, 0.3, 0.7]  # a variable frame rate
    with VideoWriter(path, 64, 48, fps=10) as writer:
        for i, t in enumerate(times):
            writer.write(_grey(50 * i), t)
    with open_video(str(path)) as video:
        assert (video.info.width, video.info.height, video.info.codec) == (64, 48, "h264")
        frames = list(video.frames())
    assert [f.index for f in frames] == list(range(5))
    np.testing.assert_allclose([f.time for f in frames], times, atol=1e-3)
    assert all(f.image is not None and f.image.shape == (48, 64, 3) for f in frames)
    means = [float(f.image.mean()) for f in frames if f.image is not None]
    np.testing.assert_allclose(means, [0, 50, 100, 150, 200], atol=3)


def test_the_writer_gives_the_same_bytes_for_the_same_frames(tmp_path: Path) -> None:
    digests = []
    for name in ("a.mp4", "b.mp4"):
        with VideoWriter(tmp_path / name, 65, 47, fps=5) as writer:  # odd sizes are padded
            for i in range(4):
                writer.write(_grey(30 * i, 47, 65))
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_an_undecodable_frame_is_reported_in_its_place(tmp_path: Path) -> None:
    path = tmp_path / "broken.mkv"
    _mjpeg_with_garbage(path, bad=2)
    with open_video(str(path)) as video:
        frames = list(video.frames())
    assert [f.index for f in frames] == list(range(6))
    np.testing.assert_allclose([f.time for f in frames], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-3)
    assert frames[2].image is None and frames[2].error is not None and "frame 2" in frames[2].error
    assert all(f.image is not None and f.error is None for k, f in enumerate(frames) if k != 2)
    assert frames[3].image is not None and abs(float(frames[3].image.mean()) - 120) < 4


def test_a_file_that_is_not_a_video_is_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("these are not frames\n" * 50)
    with pytest.raises(VideoError, match="not a video"):
        open_video(str(text))
    with pytest.raises(VideoError, match="not a video"):
        open_video(str(tmp_path / "missing.mp4"))


def test_upright_turns_by_the_display_matrix() -> None:
    image = np.arange(2 * 3 * 1).reshape(2, 3, 1)  # (H, W, C)
    assert upright(image, 0).shape == (2, 3, 1)
    turned = upright(image, -90)  # the matrix of a phone held upright: turn clockwise
    assert turned.shape == (3, 2, 1)
    np.testing.assert_array_equal(turned[..., 0], [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(upright(image, 180)[..., 0], [[5, 4, 3], [2, 1, 0]])
    assert upright(image, 45).shape == (2, 3, 1)  # not a quarter turn: left as it is
