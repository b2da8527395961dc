"""Side-by-side speed and memory of gdino's SAM 2.1 and SAM against transformers' ``Sam2Model`` and ``SamModel``.

    python bench/segment.py --threads 2 --iters 3                  # SAM 2.1 tiny and SAM ViT-B, fp32
    python bench/segment.py --family sam2 --dtype bf16             # ours in bf16, the reference in fp32
    python bench/segment.py --family sam2 --detector               # also: what masks add to a detection

Both implementations load the same checkpoint (random weights in the published architecture,
``Sam2Config()`` = hiera-tiny and ``SamConfig()`` = ViT-B, built once with transformers and saved
in the Hugging Face layout) and run the same tensors: one 1024 x 1024 image and ``--boxes`` box
prompts, the image encoder plus the mask decoder, ``multimask_output=False`` (what grounded
segmentation asks for). Each implementation runs in its own worker process, so its peak RSS
(``getrusage``) is its own; the parent sends "run" to the workers in turns (A B A B ...), so both
see the same machine conditions. ``--detector`` adds a third worker, gdino's grounding-dino-tiny
(random weights) on an 800 x 1199 image, so the report gives the masks' share of a detection.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GDINO_BENCH_CACHE", Path.home() / ".cache" / "gdino-bench"))
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FAMILIES = {"sam2": "SAM 2.1 hiera-tiny", "sam": "SAM ViT-B"}


# --------------------------------------------------------------------------- workers


def worker(args: argparse.Namespace) -> None:
    """One implementation in its own process: load, then answer "run" / "quit" on stdin (JSON replies)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import resource

    import torch

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    run = _runner(args, torch, dtype)
    proto.write(json.dumps({"event": "ready", "rss_mb": _rss_now_mb()}) + "\n")
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            with torch.inference_mode():
                run()
            proto.write(json.dumps({"event": "ran", "latency_s": time.perf_counter() - t0}) + "\n")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
            proto.write(json.dumps({"event": "done", "peak_rss_mb": peak}) + "\n")
            return


def _runner(args: argparse.Namespace, torch: Any, dtype: Any) -> Any:
    """The loaded model and inputs of ``args.worker``, as a function of no arguments that runs once."""
    inputs = torch.load(args.inputs, weights_only=True)
    if args.worker == "detector":
        from gdino import AutoModelForZeroShotObjectDetection

        detector = AutoModelForZeroShotObjectDetection.from_pretrained(args.model, dtype=dtype).eval()
        return lambda: detector(**inputs)
    pixels = inputs["pixel_values"].to(dtype)
    boxes = inputs["input_boxes"]  # (1, P, 4) pixels of the 1024 x 1024 input
    if args.worker == "hf":
        import transformers

        cls = transformers.Sam2Model if args.family == "sam2" else transformers.SamModel
        model = cls.from_pretrained(args.model, dtype=dtype).eval()
        return lambda: model(pixel_values=pixels, input_boxes=boxes.to(dtype), multimask_output=False)
    if args.family == "sam2":
        from gdino.checkpoint.sam2_loading import load_sam2

        sam2 = load_sam2(args.model, dtype=dtype)
        return lambda: sam2(pixels, boxes=boxes.to(dtype), multimask_output=False)
    from gdino.checkpoint.sam_loading import load_sam

    sam = load_sam(args.model, dtype=dtype)
    return lambda: sam(pixels, input_boxes=boxes.to(dtype), multimask_output=False)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, name: str, args: argparse.Namespace, family: str, model: Path, inputs: Path, dtype: str):
        self.name = name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--family", family]
        cmd += ["--model", str(model), "--inputs", str(inputs), "--dtype", dtype, "--threads", str(args.threads)]
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            OMP_NUM_THREADS=str(args.threads),
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        )
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.ready = self._read("ready")
        self.latencies: list[float] = []

    def _read(self, event: str) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited with status {self.proc.wait()} (its stderr is above)")
        message = json.loads(line)
        assert message["event"] == event, message
        return message

    def ask(self, command: str, event: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(event)


# --------------------------------------------------------------------------- checkpoints and inputs


def ensure_checkpoint(family: str) -> Path:
    """A random-weight published-size checkpoint in the Hugging Face layout, built once into the cache."""
    directory = CACHE / f"{family}-random"
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    import torch
    import transformers

    print(f"building the random-weight {FAMILIES[family]} checkpoint in {directory} (once)", file=sys.stderr)
    torch.manual_seed(0)
    if family == "sam2":
        model = transformers.Sam2Model(transformers.Sam2Config())
    else:
        model = transformers.SamModel(transformers.SamConfig())
    shared = getattr(model.prompt_encoder, "shared_embedding", None)
    if shared is not None:  # one position matrix, as in every published file (transformers inits two)
        with torch.no_grad():
            shared.positional_embedding.copy_(model.shared_image_embedding.positional_embedding)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + "."))
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def make_inputs(path: Path, boxes: int, detector: bool) -> None:
    """One 1024 x 1024 image and ``boxes`` boxes (seeded), and the detector's inputs if asked for."""
    import torch

    g = torch.Generator().manual_seed(0)
    corners = torch.rand(boxes, 2, generator=g) * 700
    sizes = 60 + torch.rand(boxes, 2, generator=g) * 260
    inputs: dict[str, Any] = {
        "pixel_values": torch.randn(1, 3, 1024, 1024, generator=g),
        "input_boxes": torch.cat([corners, corners + sizes], dim=1)[None],  # (1, P, 4)
    }
    torch.save(inputs, path)
    if detector:
        from PIL import Image

        from gdino import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(ensure_detector()))
        image = Image.open(ROOT / "tests" / "data" / "chelsea.png").convert("RGB")
        torch.save(dict(processor(images=image, text="a cat. a remote control.")), path.with_suffix(".detector.pt"))


def ensure_detector() -> Path:
    """bench/compare.py's random-weight grounding-dino-tiny."""
    sys.path.insert(0, str(ROOT / "bench"))
    from compare import ensure_model

    return ensure_model("tiny")


# --------------------------------------------------------------------------- parent


def measure(args: argparse.Namespace, family: str, tmp: Path) -> dict[str, Any]:
    """One family: the reference and ours in turns, and the detector if asked for."""
    model = ensure_checkpoint(family)
    inputs = tmp / "inputs.pt"
    make_inputs(inputs, args.boxes, args.detector)
    workers = [
        Worker("hf", args, family, model, inputs, args.ref_dtype),
        Worker("gdino", args, family, model, inputs, args.dtype),
    ]
    if args.detector:
        workers.append(Worker("detector", args, family, ensure_detector(), inputs.with_suffix(".detector.pt"), "fp32"))
    for i in range(args.warmup + args.iters):
        for w in workers:
            latency = w.ask("run", "ran")["latency_s"]
            if i >= args.warmup:
                w.latencies.append(latency)
    report: dict[str, Any] = {"family": FAMILIES[family], "boxes": args.boxes}
    for w in workers:
        done = w.ask("quit", "done")
        w.proc.wait()
        report[w.name] = {"median_s": statistics.median(w.latencies), "peak_rss_mb": done["peak_rss_mb"]}
    report["speed_ratio"] = report["hf"]["median_s"] / report["gdino"]["median_s"]
    report["memory_ratio"] = report["gdino"]["peak_rss_mb"] / report["hf"]["peak_rss_mb"]
    if args.detector:
        report["masks_share_of_detection"] = report["gdino"]["median_s"] / report["detector"]["median_s"]
    return report


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{report['family']}: one 1024x1024 image, {report['boxes']} boxes, image encoder + decoder")
    print(f"  {'':26}{'median s':>10}{'peak RSS MB':>14}")
    names = {"hf": f"transformers ({args.ref_dtype})", "gdino": f"gdino ({args.dtype})", "detector": "detector (tiny)"}
    for key, name in names.items():
        if key in report:
            print(f"  {name:26}{report[key]['median_s']:10.3f}{report[key]['peak_rss_mb']:14.0f}")
    print(f"  speed: {report['speed_ratio']:.2f}x transformers'; memory: {report['memory_ratio']:.2f} of its peak")
    if "masks_share_of_detection" in report:
        print(f"  masks add {report['masks_share_of_detection']:.2f} of a detection's time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=[*FAMILIES, "both"], default="both")
    p.add_argument("--boxes", type=int, default=10, help="box prompts on the image (default 10)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="our dtype")
    p.add_argument("--ref-dtype", choices=list(DTYPES), default="fp32", help="the reference's dtype")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each worker")
    p.add_argument("--iters", type=int, default=3, help="timed runs of each implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each implementation first")
    p.add_argument("--detector", action="store_true", help="also time gdino's grounding-dino-tiny detection")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    p.add_argument("--worker", choices=["hf", "gdino", "detector"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.iters < 1 or args.warmup < 0 or args.boxes < 1:
        p.error("--iters and --boxes must be at least 1, --warmup at least 0")
    tmp = Path(tempfile.mkdtemp(prefix="gdino-bench-segment."))
    reports = []
    try:
        for family in FAMILIES if args.family == "both" else [args.family]:
            reports.append(measure(args, family, tmp))
            print_report(reports[-1], args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
