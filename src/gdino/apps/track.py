"""``gdino track VIDEO --classes LIST --out OUT``: detection and ByteTrack ids through a video.

A thin layer over ``gdino.inference.video_tracking``. The video is opened and checked first (a
file that is not a video is one line and exit status 2 before the model loads), then frames are
decoded, detected in batches and tracked as they come; ``OUT/tracks.jsonl`` and ``OUT/mot/`` grow
frame by frame, ``OUT/annotations.xml`` is written at the end (``gdino.apps.track_outputs``).

Each frame's detections go to the journal ``OUT/.gdino-track.jsonl`` (flushed and synced a
frame at a time) before anything is drawn from them. Started again on the same video with the same
detection settings, a run reads the journal's frames instead of detecting them, replays the
tracker over them and writes every output fresh, so the outputs are those of an uninterrupted run.
With ``--masks`` the journal also holds each detection's mask (COCO RLE), so the replay needs no
frame images either.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from gdino.apps.arguments import (
    UsageError,
    add_model_arguments,
    add_overwrite_argument,
    add_threads_argument,
    check_device,
    check_output_folder,
    error,
    fraction,
    load_detector,
    model_name,
    positive_int,
    same_file,
)
from gdino.apps.masking import add_masks_argument, load_masks_segmenter

JOURNAL = ".gdino-track.jsonl"
OUTPUTS = ("tracks.jsonl", "annotations.xml", "annotated.mp4", "mot")


def add_arguments(commands: Any) -> None:
    """Adds ``track`` to ``gdino``'s subparsers."""
    track = commands.add_parser("track", help="detect and track objects through a video (gdino[video])")
    track.add_argument("video", metavar="VIDEO", help="a video file, a URL FFmpeg can open, or - for stdin")
    what = track.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help='"a cat. a dog." (phrases)')
    what.add_argument("--classes", help='"cat,dog" (a label list), or a file with one class a line')
    track.add_argument("--out", type=Path, required=True, help="output folder (started again, it resumes)")
    track.add_argument("--stride", type=positive_int, default=1, help="detect every N-th frame, carry tracks between")
    track.add_argument("--batch-size", type=positive_int, default=4, help="frames per detector call (default 4)")
    track.add_argument(
        "--track-threshold", type=fraction, default=0.2, help="score that starts and first matches tracks (0.2)"
    )
    track.add_argument(
        "--low-threshold",
        type=fraction,
        default=0.1,
        help="the detector's box threshold: weaker boxes only continue tracks",
    )
    track.add_argument("--match-iou", type=fraction, default=0.2, help="least IoU of a track and a detection (0.2)")
    track.add_argument("--lost-frames", type=int, default=30, help="frames a track unseen keeps its id (default 30)")
    track.add_argument(
        "--coast-frames", type=int, default=3, help="frames a lost track is still given, at its predicted box (3)"
    )
    track.add_argument("--nms", type=fraction, default=0.5, metavar="IOU", help="per-label NMS of each frame (0.5)")
    track.add_argument("--annotate", action="store_true", help="also write OUT/annotated.mp4")
    track.add_argument("--input-format", default=None, help="FFmpeg's input format when it cannot be guessed (v4l2)")
    add_masks_argument(track, "add each tracked box's mask on the frames it was detected on (COCO RLE)")
    add_overwrite_argument(track, "outputs in --out that no gdino track run wrote, or another run's")
    add_model_arguments(track)
    add_threads_argument(track)


def _settings(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """What the journal's detections depend on; a resumed run must match them."""
    source = args.video if args.video == "-" or "://" in args.video else str(Path(args.video).resolve())
    name = getattr(args, "masks", None)
    masks = {} if name is None else {"masks": str(name)}  # journals without masks stay as they were
    return {
        "gdino_track": 1,
        "video": source,
        "model": model_name(args),
        "dtype": args.dtype,
        "names": names,
        "prompt": args.prompt,
        "low_threshold": args.low_threshold,
        "nms": args.nms,
        "stride": args.stride,
    } | masks


def check_out(args: argparse.Namespace) -> None:
    """Refuses an ``--out`` that is the input or holds it, or holds outputs no earlier run of ours wrote."""
    out: Path = args.out
    if args.video != "-" and "://" not in args.video:
        video = Path(args.video)
        if same_file(out, video) or out.resolve() == video.resolve() or out.resolve() in video.resolve().parents:
            raise UsageError(f"--out {out} is the video or a folder above it; choose a new folder")
    check_output_folder(out, "--out")
    ours = (out / JOURNAL).exists()
    there = [name for name in OUTPUTS if (out / name).exists() or (out / name).is_symlink()]
    if there and not ours and not args.overwrite:
        raise UsageError(
            f"--out {out} already holds {there[0]}, which no gdino track run wrote; give --overwrite or another folder"
        )


def _query(args: argparse.Namespace) -> tuple[str | None, list[str] | None]:
    """(phrase prompt, label list) from ``--prompt`` or ``--classes``; one of them None.

    Raises:
        LabelError: ``--classes`` names no class, or one twice.
    """
    from gdino.apps.label import parse_classes
    from gdino.processing.prompts import prompt_from_text

    if args.classes is not None:
        return None, parse_classes(args.classes)
    prompt = prompt_from_text(args.prompt)
    return (None, list(prompt)) if isinstance(prompt, list) else (prompt, None)


class Journal:
    """The frames already detected (a prefix of the video), read in step, and the appending of new ones."""

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.count = 0
        if resume and path.exists():
            self.count = self._check(settings)
        if self.count == 0:
            path.write_text(json.dumps(settings) + "\n")
        self._reader: IO[str] = open(path)  # noqa: SIM115 (open for the run, closed by close())
        self._reader.readline()
        self._writer = open(path, "a")  # noqa: SIM115 (as above)

    def _check(self, settings: dict[str, Any]) -> int:
        """Frames journaled; truncates a line cut short by a kill. Raises ``UsageError`` on other settings."""
        good, count = 0, 0
        with open(self.path, "rb") as f:
            header = f.readline()
            try:
                theirs = json.loads(header)
            except json.JSONDecodeError:
                return 0
            if theirs != settings:
                changed = sorted(k for k in settings.keys() | theirs.keys() if theirs.get(k) != settings.get(k))
                raise UsageError(
                    f"--out {self.path.parent} holds a run with other {', '.join(changed)}; "
                    "give the same settings to resume, --overwrite to start again, or another --out"
                )
            good = len(header)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    break
                good += len(line)
                count += 1
        os.truncate(self.path, good)
        return count

    def known(self, index: int) -> Any:
        from gdino.inference.video_tracking import FrameDetections

        if index >= self.count:
            return None
        record = json.loads(self._reader.readline())
        assert record["frame"] == index, (record["frame"], index)
        return FrameDetections.from_record(record)

    def add(self, frame: Any) -> None:
        self._writer.write(json.dumps(frame.to_record()) + "\n")

    def sync(self) -> None:
        self._writer.flush()
        os.fsync(self._writer.fileno())

    def close(self) -> None:
        self.sync()
        self._reader.close()
        self._writer.close()


def main(args: argparse.Namespace) -> int:
    """Runs ``gdino track``; returns the exit status (2 for bad input)."""
    from gdino.apps.label import LabelError
    from gdino.processing.video import VideoError, is_live, open_video

    try:
        prompt, labels = _query(args)
        if args.lost_frames < 0 or args.coast_frames < 0:
            raise UsageError("--lost-frames and --coast-frames must be 0 or more")
        if args.low_threshold > args.track_threshold:
            raise UsageError(f"--low-threshold {args.low_threshold} is above --track-threshold {args.track_threshold}")
        video = open_video(args.video, args.input_format)  # a non-video is refused before OUT is made
    except (UsageError, VideoError, LabelError) as e:
        return error(str(e))
    try:
        check_out(args)
        args.device = check_device(args.device)
    except UsageError as e:
        video.close()
        return error(str(e))
    with video:
        from gdino.processing.text import PromptError
        from gdino.utils.hub import CheckpointError

        try:
            model = load_detector(args)
            names = list(model.phrases(prompt, labels=labels))
            segmenter = load_masks_segmenter(args, model)  # None without --masks; before any frame is decoded
            settings = _settings(args, names)
            journal = Journal(args.out / JOURNAL, settings, resume=not args.overwrite and not is_live(args.video))
        except (CheckpointError, PromptError, UsageError) as e:
            return error(str(e))
        try:
            return _run(args, (model, segmenter), (prompt, labels), names, video, journal)
        finally:
            journal.close()


def _run(
    args: argparse.Namespace,
    models: tuple[Any, Any],
    query: tuple[str | None, list[str] | None],
    names: list[str],
    video: Any,
    journal: Journal,
) -> int:
    from gdino.apps.track_outputs import ANNOTATED, CVAT, JSONL, Annotator, StreamedOutputs, cvat_xml
    from gdino.inference.tracking import TrackerSettings
    from gdino.inference.video_tracking import detect_frames, detector_call, track_detections
    from gdino.processing.video_writer import VideoWriter
    from gdino.utils.files import write_atomic

    tracker = TrackerSettings(
        args.track_threshold,
        args.low_threshold,
        args.match_iou,
        lost_frames=args.lost_frames,
        coast_frames=args.coast_frames,
    )
    detect = detector_call(models[0], query[0], query[1], args.low_threshold, None, args.nms, models[1])
    found = detect_frames(video.frames(), detect, args.stride, args.batch_size, journal.known)
    tracked = track_detections(_pair(found), names, tracker, args.stride, masks=models[1] is not None)
    outputs = StreamedOutputs(args.out, names)
    annotator = Annotator() if args.annotate else None
    writer: VideoWriter | None = None
    status, progress = 0, _Progress(video.info.frames, journal.count)
    try:
        for (frame, _), result in _journaled(tracked, journal):
            if result.error is not None:
                status = error(result.error)
            outputs.write(result)
            if annotator is not None and frame.image is not None:
                if writer is None:
                    height, width = frame.image.shape[:2]
                    writer = VideoWriter(args.out / ANNOTATED, width, height, video.info.fps or 25.0)
                writer.write(annotator.draw(frame.image, result), frame.time)
            progress.step(result.index, result.index < journal.count)
    finally:
        outputs.close()
        if writer is not None:
            writer.close()
        progress.close()
    name = "stdin" if args.video == "-" else Path(args.video).name
    write_atomic(args.out / CVAT, cvat_xml(args.out / JSONL, names, name))
    return status


def _pair(found: Iterator[Any]) -> Iterator[Any]:
    """(frame, detections) -> ((frame, detections), detections): the frame rides along through the tracker."""
    for frame, detections in found:
        yield (frame, detections), detections


def _journaled(tracked: Iterator[Any], journal: Journal) -> Iterator[Any]:
    """Journals each frame not yet in the journal (synced) before it is used."""
    for (frame, detections), result in tracked:
        if detections.index >= journal.count:
            journal.add(detections)
            journal.sync()
        yield (frame, detections), result


class _Progress:
    """``track 120/600 frames [00:40<02:40, 3.0 frames/s]`` on stderr, now and then."""

    def __init__(self, total: int | None, skipped: int, stream: IO[str] | None = None, every: float = 5.0) -> None:
        self.total, self.skipped, self.every = total, skipped, every
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self, index: int, replayed: bool) -> None:
        self.done = index + 1
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = max(0, self.done - self.skipped) / max(now - self.start, 1e-9)
        left = f"<{(self.total - self.done) / rate:.0f}s" if self.total and rate else ""
        total = f"/{self.total}" if self.total else ""
        print(
            f"track {self.done}{total} frames [{now - self.start:.0f}s{left}, {rate:.2f} frames/s]",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        self._line(time.monotonic())
