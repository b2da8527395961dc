"""Reading video: frames as RGB arrays with their time stamps, one at a time, through PyAV (FFmpeg).

``open_video(source)`` opens a file, a URL FFmpeg can read (``rtsp://``, ``http://``), a capture
device (``format="v4l2"``) or ``"-"`` (a stream piped on stdin) and checks that it holds a video
stream; anything else is a ``VideoError``, raised before any frame is decoded. ``frames()`` then
decodes packet by packet, so memory stays bounded whatever the length: only the frame being handed
out is held. Each frame carries its presentation time in seconds (so variable frame rates keep
their timing) and is turned upright by its display matrix (phone videos' rotation). A packet the
decoder refuses becomes a ``VideoFrame`` with ``image=None`` and the decoder's message, keeping
its time stamp and its place in the count; decoding goes on with the next packet.

PyAV is optional (``pip install 'gdino[video]'``) and imported when a video is opened.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

VIDEO_EXTRA = "reading video needs PyAV: pip install 'gdino[video]' (or pip install av)"


class VideoError(ValueError):
    """A source that cannot be opened as a video, or holds no video stream."""


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame, or the place of one that could not be decoded.

    Attributes:
        index: 0-based position in the stream, counting undecodable packets too.
        time: presentation time in seconds (from the stream's time stamps).
        image: (H, W, 3) uint8 RGB, upright; None when the frame could not be decoded.
        error: why it could not be decoded; None for a good frame.
    """

    index: int
    time: float
    image: np.ndarray | None
    error: str | None = None


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about its video stream.

    Attributes:
        width, height: of the upright frames, in pixels.
        fps: the average frame rate (None when the container does not say).
        frames: the number of frames, when the container knows it (files, not live sources).
        codec: the decoder's name, e.g. "h264".
        rotation: degrees the frames are turned counter-clockwise to stand upright (0, 90, 180, -90).
    """

    width: int
    height: int
    fps: float | None
    frames: int | None
    codec: str
    rotation: int


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoError(VIDEO_EXTRA) from None
    return av


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """``image`` (H, W, C) turned counter-clockwise by ``rotation`` degrees (a multiple of 90, as a
    display matrix gives it), as FFmpeg's autorotate shows it; other angles are left as they are."""
    quarter = round(rotation / 90.0)
    if quarter % 4 == 0 or abs(rotation - 90.0 * quarter) > 1e-3:
        return image
    return np.ascontiguousarray(np.rot90(image, k=quarter))  # (W, H, C) for odd quarters


class VideoReader:
    """An open video source; use as a context manager, and ``frames()`` to decode.

    Args:
        source: a path, a URL FFmpeg can open, or "-" for stdin.
        format: FFmpeg's input format when it cannot be guessed (e.g. "v4l2", "mpegts").
        options: FFmpeg options for opening (e.g. {"rtsp_transport": "tcp"}).

    Raises:
        VideoError: the source cannot be opened, or holds no video stream.
    """

    def __init__(self, source: str, format: str | None = None, options: dict[str, str] | None = None) -> None:
        av = _av()
        self.source = source
        target: Any = sys.stdin.buffer if source == "-" else source
        try:
            self._container = av.open(target, mode="r", format=format, options=options or {})
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{_name(source)} is not a video FFmpeg can read: {_reason(e)}") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError(f"{_name(source)} holds no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        self.info = self._info()

    def _info(self) -> VideoInfo:
        stream = self._stream
        rate = stream.average_rate or stream.guessed_rate
        rotation = _stream_rotation(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if round(rotation / 90.0) % 2:
            width, height = height, width
        frames = int(stream.frames) if stream.frames else None
        return VideoInfo(width, height, float(rate) if rate else None, frames, stream.codec_context.name, rotation)

    def frames(self) -> Iterator[VideoFrame]:
        """Every frame in order, decoded one packet at a time; undecodable ones as error frames."""
        av = _av()
        index = 0
        base = self._stream.time_base
        for packet in self._container.demux(self._stream):
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as e:
                if packet.pts is None and packet.size == 0:
                    continue
                time = float(packet.pts * base) if packet.pts is not None and base else _next_time(index, self.info)
                yield VideoFrame(index, time, None, f"frame {index} (t={time:.3f}s) could not be decoded: {_reason(e)}")
                index += 1
                continue
            for frame in decoded:
                yield self._frame(frame, index)
                index += 1

    def _frame(self, frame: Any, index: int) -> VideoFrame:
        time = float(frame.time) if frame.time is not None else _next_time(index, self.info)
        image = upright(frame.to_ndarray(format="rgb24"), float(getattr(frame, "rotation", 0) or 0))
        return VideoFrame(index, time, image)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def open_video(source: str, format: str | None = None, options: dict[str, str] | None = None) -> VideoReader:
    """``VideoReader(source, format, options)``: opened and checked, no frame decoded yet."""
    return VideoReader(source, format, options)


def is_live(source: str) -> bool:
    """Whether a source can be read only once, as it comes (stdin, a URL, a device): no resume."""
    return source == "-" or "://" in source or source.startswith("/dev/")


def _stream_rotation(stream: Any) -> int:
    """The stream's display-matrix rotation in degrees (counter-clockwise), 0 when it has none."""
    for side in getattr(stream, "side_data", {}) or {}:
        if "DISPLAYMATRIX" in str(side).upper():
            value = stream.side_data[side]
            return round(float(value)) if isinstance(value, (int, float)) else 0
    rotate = stream.metadata.get("rotate") if stream.metadata else None
    return -int(rotate) if rotate and rotate.lstrip("-").isdigit() else 0


def _next_time(index: int, info: VideoInfo) -> float:
    """A time stamp for a frame that has none: its index over the frame rate (0 without one)."""
    return index / info.fps if info.fps else 0.0


def _name(source: str) -> str:
    return "stdin" if source == "-" else source


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return (str(text).strip().splitlines() or [type(error).__name__])[0][:200]
