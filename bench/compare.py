"""Side-by-side speed, memory and load time of gdino against transformers' Grounding DINO.

    python bench/compare.py --threads 2 --iters 3                # fp32 against fp32
    python bench/compare.py --threads 2 --iters 3 --dtype bf16   # ours in bf16, the reference in fp32

Both implementations load the same checkpoint (a random-weight grounding-dino-tiny built once with
``tests/reference.py`` unless ``--model DIR`` is given) and run the same input tensors. Each one
runs in its own worker process, so that each worker's peak RSS (``getrusage``) is its own. The
parent builds the inputs once, then sends "run" to the reference worker and to ours in turns
(A B A B ...), one forward pass at a time, so that both see the same machine conditions. See
bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
DEFAULT_IMAGE = ROOT / "tests" / "data" / "chelsea.png"
DEFAULT_PROMPT = "a cat. a remote control."
CACHE = Path(os.environ.get("GDINO_BENCH_CACHE", Path.home() / ".cache" / "gdino-bench"))
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NAMES = {"hf": "transformers (reference)", "gdino": "gdino (ours)"}


# --------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """One implementation in its own process: load, then answer "run" / "save PATH" / "quit" on stdin.

    Replies are JSON lines on the original stdout; anything the libraries print goes to stderr.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")

    t0 = time.perf_counter()
    import resource

    import torch

    torch.set_num_threads(args.threads)
    rss_torch = _rss_now_mb()
    if args.worker == "hf":  # GroundingDinoForObjectDetection or MMGroundingDinoForObjectDetection, by config
        from transformers import AutoModelForZeroShotObjectDetection as Model
        from transformers.utils import logging

        logging.disable_progress_bar()
    else:
        from gdino import AutoModelForZeroShotObjectDetection as Model
    import_s = time.perf_counter() - t0
    dtype = getattr(torch, DTYPES[args.dtype])
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    model = Model.from_pretrained(args.model, dtype=dtype)
    model = model.to(device).eval()
    sync()
    load_s = time.perf_counter() - t0
    ready = {
        "event": "ready",
        "import_s": import_s,
        "load_s": load_s,
        "rss_torch_mb": rss_torch,
        "rss_loaded_mb": _rss_now_mb(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "module": sys.modules[Model.__module__].__file__,
    }
    if args.load_only:
        send(**ready, peak_rss_mb=_peak_rss_mb(resource))
        return

    raw = torch.load(args.inputs, weights_only=True)
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in raw.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    send(**ready)
    out = None
    for line in sys.stdin:
        cmd, _, rest = line.strip().partition(" ")
        if cmd == "run":
            sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model(**inputs)
            sync()
            send(event="ran", latency_s=time.perf_counter() - t0)
        elif cmd == "save":
            assert out is not None, "save before run"
            index = getattr(out, "query_index", None)  # ours only: the image tokens selected as queries
            torch.save(
                {
                    "logits": out.logits.float().cpu(),
                    "pred_boxes": out.pred_boxes.float().cpu(),
                    "query_index": None if index is None else index.cpu(),
                },
                rest,
            )
            send(event="saved")
        elif cmd == "run-selected":  # ours only: decode the queries another run selected (saved in a file)
            index = torch.load(rest, weights_only=True)["query_index"].to(device)
            with torch.inference_mode():
                out = model(**inputs, query_index=index)
            send(event="ran", latency_s=0.0)
        elif cmd == "quit":
            cuda_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            send(event="done", peak_rss_mb=_peak_rss_mb(resource), cuda_peak_mb=cuda_peak)
            return
        else:
            raise SystemExit(f"worker: unknown command {line!r}")


def _peak_rss_mb(resource: Any) -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Worker:
    """The parent's handle on a worker process."""

    def __init__(self, impl: str, args: argparse.Namespace, dtype: str, inputs: Path | None, load_only: bool = False):
        self.impl, self.dtype = impl, dtype
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            impl,
            "--model",
            str(args.model),
            "--dtype",
            dtype,
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ]
        cmd += ["--load-only"] if load_only else ["--inputs", str(inputs)]
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_VERBOSITY="error",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TQDM_DISABLE="1",
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
        )
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.src), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self.ready = self._read("ready")
        if impl == "gdino" and not self.ready["module"].startswith(str(args.src)):
            raise RuntimeError(f"the gdino worker imported {self.ready['module']}, not the snapshot in {args.src}")
        self.latencies: list[float] = []

    def _read(self, event: str) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(
                f"{NAMES[self.impl]} worker ({self.dtype}) exited with status {code} (see its stderr above)"
            )
        msg = json.loads(line)
        assert msg["event"] == event, msg
        return msg

    def _ask(self, command: str, event: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(event)

    def run(self) -> float:
        return self._ask("run", "ran")["latency_s"]

    def save(self, path: Path) -> None:
        self._ask(f"save {path}", "saved")

    def run_selected(self, index_file: Path, path: Path) -> None:
        """One forward pass decoding the queries selected in ``index_file``'s run; outputs to ``path``."""
        self._ask(f"run-selected {index_file}", "ran")
        self.save(path)

    def quit(self) -> dict[str, Any]:
        done = self._ask("quit", "done")
        self.proc.wait()
        return done


# --------------------------------------------------------------------------- checkpoint and inputs


def ensure_model(preset: str) -> Path:
    """The random-weight checkpoint of tests/reference.py, built once into the cache."""
    directory = CACHE / f"{preset}-random"
    if (directory / "model.safetensors").is_file() and (directory / "config.json").is_file():
        return directory
    spec = importlib.util.spec_from_file_location("gdino_bench_reference", ROOT / "tests" / "reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    print(f"building the random-weight {preset} checkpoint in {directory} (once)", file=sys.stderr)
    config = _preset_config(reference, preset)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + "."))
    reference.save_reference(reference.build_reference(config), tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def _preset_config(reference: Any, preset: str) -> Any:
    """transformers' config of a random-weight preset: the published architectures, or a small one."""
    from transformers import GroundingDinoConfig, SwinConfig

    swin_b = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12}
    if preset == "small":
        return reference.small_reference_config()
    if preset == "base":  # grounding-dino-base
        return GroundingDinoConfig(
            backbone_config=SwinConfig(**swin_b, image_size=384, out_features=["stage2", "stage3", "stage4"])
        )
    if preset == "mm-tiny":  # MM-Grounding-DINO tiny / LLMDet tiny: per-layer heads
        return reference.as_mm_config(GroundingDinoConfig(), share=False)
    return None  # grounding-dino-tiny


def make_inputs(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The batch both models run: transformers' processor output, checked against ours.

    ``--size S`` sets the processors' shortest edge to S (the longest edge limit scales with it,
    1333 at 800), so the pixel tensors are S pixels on their short side.
    """
    import torch
    from PIL import Image
    from transformers import GroundingDinoProcessor as HFProcessor

    import gdino
    from gdino.processing.image import ImageSettings

    image = Image.open(args.image).convert("RGB")
    images, text = [image] * args.batch, [args.prompt] * args.batch
    size = {"shortest_edge": args.size, "longest_edge": round(1333 * args.size / 800)}
    hf = HFProcessor.from_pretrained(args.model)(images=images, text=text, return_tensors="pt", size=size)
    hf = {k: v for k, v in hf.items() if isinstance(v, torch.Tensor)}
    ours_processor = gdino.AutoProcessor.from_pretrained(args.model)
    ours_processor.image_settings = dataclasses.replace(
        ours_processor.image_settings or ImageSettings(),
        shortest_edge=size["shortest_edge"],
        longest_edge=size["longest_edge"],
    )
    ours = ours_processor(images=images, text=text)
    check = {}
    for key, value in hf.items():
        other = ours.get(key)
        if other is None or other.shape != value.shape:
            check[key] = f"differs: {None if other is None else tuple(other.shape)} vs {tuple(value.shape)}"
        else:
            diff = (other.double() - value.double()).abs().max().item() if value.numel() else 0.0
            check[key] = "identical" if diff == 0 else f"max abs diff {diff:.2e}"
    torch.save(hf, path)
    return {"shapes": {k: list(v.shape) for k, v in hf.items()}, "processor_check": check}


# --------------------------------------------------------------------------- agreement


def agreement(base_file: Path, other_file: Path) -> dict[str, Any]:
    """``other``'s run against ``base``'s: the top queries matched by box (tests/agreement.py), and
    how many of the image tokens ``base`` selected as queries ``other`` selected too."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from agreement import TOP_K, match_top_queries, selection_overlap  # imports torch and gdino: parent only

    base, other = torch.load(base_file), torch.load(other_file)
    report = match_top_queries(base["logits"], base["pred_boxes"], other["logits"], other["pred_boxes"], TOP_K)
    if base.get("query_index") is not None and other.get("query_index") is not None:
        report["selection"] = selection_overlap(base["query_index"], other["query_index"])
    return report


# --------------------------------------------------------------------------- parent


def measure_loads(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """``--loads`` cold loads of each implementation, each in a fresh process, in turns."""
    loads: dict[str, list[dict[str, Any]]] = {"hf": [], "gdino": []}
    for _ in range(args.loads):
        for impl, dtype in (("hf", args.ref_dtype), ("gdino", args.dtype)):
            w = Worker(impl, args, dtype, None, load_only=True)
            w.proc.wait()
            loads[impl].append(w.ready)
    return loads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        type=Path,
        help="a checkpoint directory in the Hugging Face layout "
        "(default: a random-weight grounding-dino-tiny, built once into ~/.cache/gdino-bench)",
    )
    p.add_argument(
        "--preset",
        choices=["tiny", "base", "mm-tiny", "small"],
        default="tiny",
        help="which random checkpoint to build without --model: grounding-dino-tiny, grounding-dino-base "
        "(Swin-B), MM-Grounding-DINO/LLMDet tiny, or 'small', a narrow one for smoke tests",
    )
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--size", type=int, default=800, help="shortest side of the processed image in pixels")
    p.add_argument("--batch", type=int, default=1, help="the image repeated N times")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="our dtype")
    p.add_argument("--ref-dtype", choices=list(DTYPES), default="fp32", help="the reference's dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads in both workers")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes of each implementation")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes of each implementation first")
    p.add_argument(
        "--loads",
        type=int,
        default=3,
        help="load times: loads in fresh processes per implementation (the timed workers' own loads are reported too)",
    )
    p.add_argument("--json", type=Path, help="also write all measurements to this file")
    p.add_argument("--worker", choices=["hf", "gdino"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.loads < 0 or args.batch < 1 or args.size < 1:
        p.error("--iters, --batch and --size must be at least 1; --warmup and --loads at least 0")
    if args.worker:
        worker(args)
        return 0

    args.model = (args.model or ensure_model(args.preset)).resolve()
    weights = next(args.model.glob("*.safetensors"), None)
    if weights is not None:  # loads are timed from the page cache, not the disk
        with open(weights, "rb") as f:
            while f.read(1 << 24):
                pass
    tmp = Path(tempfile.mkdtemp(prefix="gdino-bench."))
    try:
        report = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # Every gdino process of this run imports one copy of src/gdino taken now, so that edits to the
    # working tree during the run cannot mix versions; the report names the copy's commit and hash.
    source = source_state()
    args.src = tmp / "src"
    shutil.copytree(ROOT / "src" / "gdino", args.src / "gdino", ignore=shutil.ignore_patterns("__pycache__"))
    source += f" (src/gdino/**.py sha256 {_tree_hash(args.src)})"
    sys.path.insert(0, str(args.src))
    inputs_file = tmp / "inputs.pt"
    info = make_inputs(args, inputs_file)
    print(
        f"inputs: {info['shapes']['pixel_values']} pixels, {info['shapes']['input_ids']} tokens; "
        f"our processor vs transformers': {info['processor_check']}",
        file=sys.stderr,
    )
    loads = measure_loads(args) if args.loads > 0 else {"hf": [], "gdino": []}

    workers = [Worker("hf", args, args.ref_dtype, inputs_file), Worker("gdino", args, args.dtype, inputs_file)]
    for w in workers:
        loads[w.impl].append(w.ready)
    for i in range(args.warmup + args.iters):
        for w in workers:  # A B A B: one forward pass each, in turns
            latency = w.run()
            if i >= args.warmup:
                w.latencies.append(latency)
            print(
                f"  {'warm-up' if i < args.warmup else 'iter'} {i}: {NAMES[w.impl]:<25} {latency:8.3f} s",
                file=sys.stderr,
            )
    outputs = {}
    for w in workers:
        outputs[w.impl] = tmp / f"{w.impl}.pt"
        w.save(outputs[w.impl])
    agreements = {"ours_vs_reference": agreement(outputs["hf"], outputs["gdino"])}
    if args.dtype != "fp32":  # against our fp32 outputs on the same checkpoint and inputs
        fp32 = Worker("gdino", args, "fp32", inputs_file)
        fp32.run()
        fp32.save(tmp / "gdino-fp32.pt")
        fp32.quit()
        name = f"ours_{args.dtype}_vs_ours_fp32"
        agreements[name] = agreement(tmp / "gdino-fp32.pt", outputs["gdino"])
        # The same comparison with the reduced-precision run decoding the queries fp32 selected:
        # what precision does to the detections themselves, apart from the near-tied ranking.
        workers[1].run_selected(tmp / "gdino-fp32.pt", tmp / "gdino-selected.pt")
        agreements[name + "_same_queries"] = agreement(tmp / "gdino-fp32.pt", tmp / "gdino-selected.pt")
    done = {w.impl: w.quit() for w in workers}

    results = {}
    for w in workers:
        results[w.impl] = {
            "dtype": w.dtype,
            "latencies_s": w.latencies,
            "median_s": statistics.median(w.latencies),
            "peak_rss_mb": done[w.impl]["peak_rss_mb"],
            "cuda_peak_mb": done[w.impl]["cuda_peak_mb"],
            "rss_torch_mb": w.ready["rss_torch_mb"],
            "rss_loaded_mb": w.ready["rss_loaded_mb"],
            "import_s": w.ready["import_s"],
            "threads": w.ready["threads"],
            "load_s": [x["load_s"] for x in loads[w.impl]],
            "load_median_s": statistics.median(x["load_s"] for x in loads[w.impl]),
            "startup_median_s": statistics.median(x["import_s"] + x["load_s"] for x in loads[w.impl]),
            "load_peak_rss_mb": [x["peak_rss_mb"] for x in loads[w.impl] if "peak_rss_mb" in x],
        }
    paired = [o / r for o, r in zip(results["gdino"]["latencies_s"], results["hf"]["latencies_s"])]
    report = {
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("worker", "inputs", "load_only", "src")},
        "source": source,
        "torch": workers[0].ready["torch"],
        "inputs": info,
        "results": results,
        "paired_ratio_median": statistics.median(paired),
    }
    report["agreement"] = agreements
    return report


def source_state() -> str:
    """The gdino source measured: the commit, and which files under src/ differ from it (read-only git)."""
    try:

        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout

        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "src").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else "")


def _tree_hash(src: Path) -> str:
    """A short sha256 of src/gdino's Python files (names and contents), to tell working trees apart."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted((src / "gdino").rglob("*.py")):
        digest.update(file.relative_to(src).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def print_report(report: dict[str, Any]) -> None:
    a, r = report["args"], report["results"]
    ref, ours = r["hf"], r["gdino"]
    print(
        f"\nimage {a['image']} x{a['batch']}, pixels {report['inputs']['shapes']['pixel_values']}, "
        f"prompt {a['prompt']!r}, device {a['device']}, threads {ref['threads']}, torch {report['torch']}, "
        f"{len(ours['latencies_s'])} timed iterations after {a['warmup']} warm-up, in turns; "
        f"gdino at {report['source']}\n"
    )
    print("| implementation | dtype | median latency s | ratio vs reference | peak RSS MB | RSS ratio | load s |")
    print("|---|---|---|---|---|---|---|")
    for impl, row in (("hf", ref), ("gdino", ours)):
        print(
            f"| {NAMES[impl]} | {row['dtype']} | {row['median_s']:.3f} | {row['median_s'] / ref['median_s']:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {row['load_median_s']:.2f} |"
        )
    print(
        f"\nours is {ref['median_s'] / ours['median_s']:.2f}x the reference's speed "
        f"(median of the per-iteration ratios ours/reference: {report['paired_ratio_median']:.2f})"
    )
    for impl, row in (("hf", ref), ("gdino", ours)):
        cuda = f", CUDA peak allocated {row['cuda_peak_mb']:.0f} MB" if row["cuda_peak_mb"] is not None else ""
        print(
            f"{NAMES[impl]}: latencies {', '.join(f'{x:.3f}' for x in row['latencies_s'])} s; "
            f"RSS after import torch {row['rss_torch_mb']:.0f} MB, after load {row['rss_loaded_mb']:.0f} MB, "
            f"peak {row['peak_rss_mb']:.0f} MB{cuda}; loads {', '.join(f'{x:.2f}' for x in row['load_s'])} s; "
            f"start-up (import + load, median) {row['startup_median_s']:.2f} s"
        )
    from agreement import MAX_SCORE_DIFF, MIN_IOU, TOP_K

    for name, ag in report["agreement"].items():
        verdict = (
            ""
            if name == "ours_vs_reference"
            else (f" -> {'meets' if ag['ok'] else 'FAILS'} IoU >= {MIN_IOU} and score diff <= {MAX_SCORE_DIFF}")
        )
        selection = ag.get("selection")
        chosen = (
            ""
            if selection is None or name.endswith("_same_queries")
            else (
                f"; selected image tokens shared {selection['shared_tokens']}/{selection['queries']}, "
                f"in the same slot {selection['same_slot']}"
            )
        )
        print(
            f"agreement {name} (top {TOP_K} queries per image): min IoU {ag['min_iou']:.4f}, "
            f"max score diff {ag['max_score_diff']:.4f}, same query {ag['same_query']}/{ag['pairs']}, "
            f"queries with NaN {ag['nan_queries']}{chosen}{verdict}"
        )


if __name__ == "__main__":
    sys.exit(main())
