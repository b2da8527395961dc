"""Writing video: RGB frames in, an encoded file out, through PyAV (FFmpeg), one frame at a time.

H.264 (libx264, yuv420p) in .mp4 / .mkv / .mov, Motion JPEG in .avi; frames are placed at their
time stamps, so a variable frame rate survives. The encoder is deterministic: the same frames
give the same bytes. Odd sizes are padded by a pixel (H.264 in 4:2:0 needs even ones).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from gdino.processing.video import VideoError, _av

TIME_BASE = Fraction(1, 1000)  # time stamps in milliseconds


class VideoWriter:
    """Encodes frames into ``path``; use as a context manager (closing writes the end of the file).

    Args:
        path: the file; its suffix chooses the container (.avi: Motion JPEG, else H.264).
        width, height: of every frame.
        fps: the nominal frame rate (frames given without a time are this far apart).
        quality: H.264's constant rate factor (lower is better; 18 is near lossless to the eye).
    """

    def __init__(self, path: str | os.PathLike[str], width: int, height: int, fps: float, quality: int = 20) -> None:
        av = _av()
        self.path = Path(path)
        self.width, self.height = width + width % 2, height + height % 2
        self.fps = fps
        try:
            self._container = av.open(str(self.path), mode="w")
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"cannot write the video {self.path}: {e}") from None
        rate = Fraction(fps).limit_denominator(1001)
        if self.path.suffix.lower() == ".avi":
            self._stream = self._container.add_stream("mjpeg", rate=rate)
            self._stream.pix_fmt = "yuvj420p"
            self._stream.options = {"q:v": "3"}
        else:
            options = {"crf": str(quality), "preset": "veryfast", "threads": "1"}  # one thread: the same bytes
            self._stream = self._container.add_stream("libx264", rate=rate, options=options)
            self._stream.pix_fmt = "yuv420p"
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.codec_context.time_base = TIME_BASE
        self._count = 0
        self._last_pts = -1

    def write(self, image: np.ndarray, time: float | None = None) -> None:
        """Adds one (H, W, 3) uint8 RGB frame, shown from ``time`` seconds (default: by the frame rate)."""
        av = _av()
        if image.shape[0] != self.height or image.shape[1] != self.width:
            image = _pad(image, self.height, self.width)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        seconds = self._count / self.fps if time is None else time
        pts = max(round(seconds / TIME_BASE), self._last_pts + 1)  # strictly increasing
        frame.pts, frame.time_base = pts, TIME_BASE
        self._last_pts = pts
        self._count += 1
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` padded at the bottom and right (edge pixels) or cropped to (height, width)."""
    image = image[:height, :width]
    pad: Any = ((0, height - image.shape[0]), (0, width - image.shape[1]), (0, 0))
    return np.pad(image, pad, mode="edge")
