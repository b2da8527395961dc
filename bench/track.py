"""Frames per second of ``gdino track``'s stages on a generated shapes video: decode, detect, track.

    python bench/track.py --threads 2                                  # gdino-shapes, 30 frames
    python bench/track.py --model IDEA-Research/grounding-dino-tiny --image-size 400 --frames 10

Decoding (PyAV) and tracking (ByteTrack) are timed on their own, detection on the decoded frames
in batches as ``gdino track`` runs it; prints one JSON line with seconds per frame of each stage
and their share. The target: decoding and tracking together under 5% of a detection.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.video_tracking import FrameDetections, detector_call, track_detections
from gdino.processing.video import open_video
from gdino.training.shapes_video import VideoSettings, video_pairs, write_shapes_video


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gdino-shapes")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=None, help="the processor's short side (default: model's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = VideoSettings(frames=args.frames)
    model = GroundingDinoForObjectDetection.from_pretrained(args.model, device=args.device).eval()
    if args.image_size:
        longest = round(1333 * args.image_size / 800)
        model.processor.image_settings = replace(
            model.processor.image_settings, shortest_edge=args.image_size, longest_edge=longest
        )
    labels = video_pairs(args.seed, settings)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.mp4"
        write_shapes_video(path, args.seed, settings)
        start = time.perf_counter()
        with open_video(str(path)) as video:
            frames = list(video.frames())
        decode = time.perf_counter() - start
    detect = detector_call(model, None, labels, 0.1, None, 0.5)
    detect([frames[0].image])  # warm-up
    start = time.perf_counter()
    found: list[FrameDetections] = []
    for i in range(0, len(frames), args.batch_size):
        batch = frames[i : i + args.batch_size]
        found += [FrameDetections.found(f, d) for f, d in zip(batch, detect([f.image for f in batch]))]
    detection = time.perf_counter() - start
    for _ in track_detections(((None, d) for d in found[:2]), labels):  # warm-up: imports scipy
        pass
    start = time.perf_counter()
    for _ in track_detections(((None, d) for d in found), labels):
        pass
    tracking = time.perf_counter() - start
    n = len(frames)
    row = {
        "model": args.model,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "frames": n,
        "size": list(settings.size),
        "fps_end_to_end": round(n / (decode + detection + tracking), 2),
        "ms_per_frame": {
            k: round(1000 * v / n, 2) for k, v in (("decode", decode), ("detect", detection), ("track", tracking))
        },
        "decode_and_track_share_of_detect": round((decode + tracking) / detection, 4),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
