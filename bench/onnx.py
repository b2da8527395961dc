"""The ONNX export side by side with PyTorch: onnxruntime, OpenVINO, ours and transformers, in fp32.

    python bench/onnx.py --model DIR --threads 2 --iters 3 [--out bench/onnx-results.json]

``DIR`` is a Hugging Face layout checkpoint (a random-weight grounding-dino-tiny built once with
``tests/reference.py`` if omitted, as bench/compare.py does). The script exports it (fp32, and an
int8 dynamically quantised copy), then runs each backend in its own worker process on the same
image and prompt, one after the other: load, one warm-up pass, ``--iters`` timed passes of the
whole ``detect`` (image graph, text graph, detection graph and decoding; for transformers the
processor and the forward pass). Each worker reports its median latency, its peak RSS
(``getrusage``) and every query's box and best score, from which the agreement with onnxruntime
fp32 is computed: its 20 best queries, each matched by box to the other run's queries.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# This file's folder would shadow the onnx package (this file is onnx.py); tests/ has reference.py.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"] + [str(ROOT / "tests")]
DEFAULT_IMAGE = ROOT / "tests" / "data" / "chelsea.png"
DEFAULT_PROMPT = "a cat. a remote control."
BACKENDS = ("ort", "ort-int8", "openvino", "gdino", "hf")


def _run_backend(name: str, model_dir: Path, export_dir: Path, int8_dir: Path, args: argparse.Namespace) -> dict:
    """In a worker process: load, warm up, time ``--iters`` passes; latency, RSS and raw outputs."""
    import numpy as np

    t0 = time.perf_counter()
    if name in ("ort", "ort-int8", "openvino"):
        import gdino.runtime.onnx

        runtime = "openvino" if name == "openvino" else "onnxruntime"
        detector = gdino.runtime.onnx.load(
            int8_dir if name == "ort-int8" else export_dir, threads=args.threads, runtime=runtime
        )

        def once() -> Any:
            encoded = detector.encode_image(args.image)
            text = detector.text_features(_normalized(args.prompt))
            return detector.detect_features(encoded.maps[0], text)[:2]
    else:
        import torch

        torch.set_num_threads(args.threads)
        if name == "gdino":
            from gdino import AutoModelForZeroShotObjectDetection as Model
            from gdino import AutoProcessor
        else:
            from transformers import GroundingDinoForObjectDetection as Model
            from transformers import GroundingDinoProcessor as AutoProcessor
        model = Model.from_pretrained(str(model_dir)).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))

        def once() -> Any:
            from PIL import Image

            inputs = processor(images=Image.open(args.image).convert("RGB"), text=args.prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model(**inputs)
            return out.logits.float().numpy(), out.pred_boxes.float().numpy()

    load_s = time.perf_counter() - t0
    once()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        logits, boxes = once()
        times.append(time.perf_counter() - t)
    logits, boxes = np.asarray(logits, dtype=np.float64)[0], np.asarray(boxes, dtype=np.float64)[0]
    return {
        "backend": name,
        "load_s": round(load_s, 2),
        "latency_s": round(statistics.median(times), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "top_scores": (1 / (1 + np.exp(-logits.max(-1)))).tolist(),
        "top_boxes": boxes.tolist(),
    }


def _normalized(prompt: str) -> str:
    from gdino.processing.prompts import normalize_prompt

    return normalize_prompt(prompt)


def _agreement(base: dict, other: dict, top: int = 20) -> dict:
    """``base``'s ``top`` best queries, each matched to the query of ``other`` (any of its queries)
    whose box overlaps it most: the smallest and median IoU, and the largest score difference.

    Matching by box, not by rank: near-tied proposals may be selected in another order (int8
    rounding, another runtime's arithmetic), which moves queries without changing detections.
    """
    import numpy as np

    def xyxy(b: np.ndarray) -> np.ndarray:
        return np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)

    s0, s1 = np.array(base["top_scores"]), np.array(other["top_scores"])
    best = np.argsort(-s0, kind="stable")[:top]
    b0, b1 = xyxy(np.array(base["top_boxes"])[best]), xyxy(np.array(other["top_boxes"]))
    lt, rb = np.maximum(b0[:, None, :2], b1[None, :, :2]), np.minimum(b0[:, None, 2:], b1[None, :, 2:])
    inter = (rb - lt).clip(min=0).prod(-1)
    area0, area1 = (b0[:, 2:] - b0[:, :2]).prod(-1), (b1[:, 2:] - b1[:, :2]).prod(-1)
    iou = inter / (area0[:, None] + area1[None] - inter)
    match = iou.argmax(1)
    best_iou = iou.max(1)
    return {
        "min_iou": round(float(best_iou.min()), 4),
        "median_iou": round(float(np.median(best_iou)), 4),
        "max_score_diff": round(float(np.abs(s0[best] - s1[match]).max()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Hugging Face layout checkpoint (default: random test weights)")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--export", type=Path, help="use this fp32 export of --model instead of exporting")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dirs", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_run_backend(args.worker, *args.dirs, args)))
        return
    work = Path(tempfile.mkdtemp(prefix="gdino-onnx-bench-"))
    model_dir = args.model or (Path("-") if args.export else _random_checkpoint(work / "checkpoint"))
    export_dir, int8_dir = work / "fp32", work / "int8"
    report: dict[str, Any] = {"image": args.image, "prompt": args.prompt, "threads": args.threads}
    if args.export:  # an existing fp32 export (of --model, for the PyTorch backends' sake)
        export_dir = args.export
    else:
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "gdino", "export", "onnx", "--model", str(model_dir), "--out", str(export_dir)],
            check=True,
        )
        report["export_fp32_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    shutil.copytree(export_dir, int8_dir)
    from gdino.export.onnx import _quantize

    _quantize(int8_dir)
    report["quantize_int8_s"] = round(time.perf_counter() - t, 1)
    for name, directory in (("fp32", export_dir), ("int8", int8_dir)):
        report[f"files_{name}_mb"] = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(directory.iterdir())}
    results = {}
    for name in args.backends.split(","):
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                name,
                "--dirs",
                str(model_dir),
                str(export_dir),
                str(int8_dir),
                "--image",
                args.image,
                "--prompt",
                args.prompt,
                "--threads",
                str(args.threads),
                "--iters",
                str(args.iters),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        if "ort" in results and "error" not in result and "error" not in results["ort"] and name != "ort":
            result["agreement_with_ort_fp32"] = _agreement(results["ort"], result)
        print(name, {k: v for k, v in result.items() if not k.startswith("top_")})
    report["backends"] = {n: {k: v for k, v in r.items() if not k.startswith("top_")} for n, r in results.items()}
    print(json.dumps({k: v for k, v in report.items() if k != "backends"}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def _random_checkpoint(directory: Path) -> Path:
    import torch

    from reference import build_reference, save_reference

    with torch.no_grad():
        return save_reference(build_reference(), directory)


if __name__ == "__main__":
    main()
