"""One training step of gdino against transformers' Grounding DINO: time and peak memory.

    python bench/train_step.py --threads 2 --steps 3 --rounds 2    # full tiny model at 800x1333, batch 1
    python bench/train_step.py --preset small --size 320 --steps 2  # smoke test of the script
    python bench/train_step.py --threads 2 --steps 1 --variants plain,frozen,lora,distill --no-reference

A step is the forward pass with ``labels`` (the loss), the backward pass and an AdamW step. Both
implementations load the same checkpoint (the random-weight grounding-dino-tiny that
``bench/compare.py`` builds, unless ``--model DIR``) and get the same saved input tensors and
targets. Each runs in its own process, one after the other, so that each peak RSS is its own;
with ``--rounds 2`` each runs twice, in alternating order (the step times of a shared machine
drift by tens of percent over minutes), and the medians are over all timed steps.
Both run in eval mode (no dropout: ours has none, and it changes no amount of work).

``--variants`` also times our step the way the forgetting options of ``gdino train`` train
(each in its own process, against our plain step): ``frozen`` (``--freeze backbone,text``: Swin
and BERT without gradients), ``lora`` (``--lora-rank 16`` on the default targets, everything else
frozen, AdamW over the adapters only) and ``distill`` (``--distill``: the frozen base model's
forward on the same inputs, under ``inference_mode``, before each step; the distillation loss
itself is a few small tensor ops and is left out). ``--replay`` adds nothing to a step: its
pseudo-labels are computed once, before training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"hf": "transformers (reference)", "gdino": "gdino (ours)"}
PROMPT_IDS = [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]  # "a cat. a remote control."


def _compare_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(height: int, width: int, batch: int, path: Path) -> None:
    """Seeded pixels, the prompt and two targets per image, saved for both workers."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([PROMPT_IDS] * batch)
    labels = [
        {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.35, 0.5, 0.5, 0.8], [0.2, 0.3, 0.15, 0.1]])}
        for _ in range(batch)
    ]
    torch.save(
        {
            "pixel_values": torch.randn(batch, 3, height, width, generator=g),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": labels,
        },
        path,
    )


def worker(args: argparse.Namespace) -> None:
    """Loads one implementation, runs warm-up and timed steps, prints one JSON line."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    if args.worker == "hf":
        from transformers import GroundingDinoForObjectDetection as Model
    else:
        from gdino import AutoModelForZeroShotObjectDetection as Model
    device = torch.device(args.device)
    model = Model.from_pretrained(args.model).to(device).eval()
    data = torch.load(args.inputs)
    inputs = {k: data[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")}
    labels = [{k: v.to(device) for k, v in t.items()} for t in data["labels"]]
    teacher = prepare_variant(model, args.variant)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> tuple[float, float]:
        t0 = time.perf_counter()
        if teacher is not None:
            with torch.inference_mode():
                teacher(**inputs)
        out = model(**inputs, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, float(out.loss.detach())

    for _ in range(args.warmup):
        step()
    times, losses = zip(*(step() for _ in range(args.steps)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    print(json.dumps({"times_s": times, "losses": losses, "peak_rss_mb": peak, "peak_gpu_mb": gpu}))


def prepare_variant(model: Any, variant: str) -> Any:
    """Freezes or adapts ``model`` as the variant trains it; returns the frozen teacher for ``distill``."""
    import copy

    if variant == "frozen":
        from gdino.training.optimizer import freeze

        freeze(model, ["backbone", "text"])
    elif variant == "lora":
        from gdino.training.lora import DEFAULT_TARGETS, apply_lora

        apply_lora(model, DEFAULT_TARGETS, 16, 16.0)
    elif variant == "distill":
        return copy.deepcopy(model).eval().requires_grad_(False)
    return None


def run_worker(
    impl: str, args: argparse.Namespace, model: Path, inputs: Path, variant: str = "plain"
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--model",
        str(model),
        "--inputs",
        str(inputs),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--variant",
        variant,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{NAMES[impl]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=list(NAMES), help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--model", help="checkpoint directory (Hugging Face layout); default: a random one, built once")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="which random checkpoint to build")
    p.add_argument("--size", type=int, default=800, help="image height; the width is round(size * 1333 / 800)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="worker processes per implementation, alternating (medians over all their steps)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the measurements to this file")
    p.add_argument("--variant", default="plain", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--variants", default="plain", help=f"our steps to time, a comma list of {', '.join(VARIANTS)}")
    p.add_argument("--no-reference", action="store_true", help="leave out transformers' step")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    model = Path(args.model) if args.model else _compare_module().ensure_model(args.preset)
    width = round(args.size * 1333 / 800)
    report: dict[str, Any] = {
        "size": [args.size, width],
        "batch": args.batch,
        "threads": args.threads,
        "device": args.device,
    }
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        make_inputs(args.size, width, args.batch, inputs)
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"bench/train_step.py: unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        impls = ([] if args.no_reference else ["hf"]) + [variant_key(v) for v in variants]
        runs: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
        for round_ in range(args.rounds):
            # Rounds alternate which goes first, so that a slow spell of a shared machine is shared.
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                name, _, variant = impl.partition(":")
                runs[impl].append(run_worker(name, args, model, inputs, variant or "plain"))
        for impl, worker_runs in runs.items():
            report[impl] = merge_runs(worker_runs)
    if "hf" in report and "gdino" in report:
        print_report(report)
    print_variants(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


VARIANTS = ("plain", "frozen", "lora", "distill")


def variant_key(variant: str) -> str:
    """The report's key of our step in ``variant``: "gdino" for the plain one (as before variants)."""
    return "gdino" if variant == "plain" else f"gdino:{variant}"


def print_variants(report: dict[str, Any]) -> None:
    """Our steps of each variant, against our plain step when it was timed."""
    ours = {k: v for k, v in report.items() if k.startswith("gdino")}
    if len(ours) < 2 and "hf" in report:
        return
    plain = ours.get("gdino")
    print("our training step by gdino train option (median step time, peak memory of the process):")
    for key, r in ours.items():
        time_s, memory = statistics.median(r["times_s"]), r["peak_gpu_mb"] or r["peak_rss_mb"]
        against = ""
        if plain is not None and key != "gdino":
            base_t, base_m = statistics.median(plain["times_s"]), plain["peak_gpu_mb"] or plain["peak_rss_mb"]
            against = f"   {time_s / base_t:.2f}x the plain step's time, {memory / base_m:.2f}x its memory"
        name = key.partition(":")[2] or "plain"
        print(f"  {name:8s} step {time_s:8.2f} s   peak memory {memory:8.0f} MB{against}")


def merge_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One implementation's rounds as one record: every timed step, the highest peak memory."""
    gpu = [r["peak_gpu_mb"] for r in runs if r["peak_gpu_mb"] is not None]
    return {
        "times_s": [t for r in runs for t in r["times_s"]],
        "losses": [x for r in runs for x in r["losses"]],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_gpu_mb": max(gpu) if gpu else None,
        "rounds": runs,
    }


def print_report(report: dict[str, Any]) -> None:
    h, w = report["size"]
    print(
        f"one training step (forward with labels, backward, AdamW), {h}x{w}, batch {report['batch']}, "
        f"{report['threads']} threads, {report['device']}"
    )
    rows = {}
    for impl in ("hf", "gdino"):
        r = report[impl]
        rows[impl] = (statistics.median(r["times_s"]), r["peak_gpu_mb"] or r["peak_rss_mb"])
        print(
            f"  {NAMES[impl]:26s} step {rows[impl][0]:8.2f} s   peak memory {rows[impl][1]:8.0f} MB   "
            f"loss {r['losses'][0]:.4f}"
        )
    for impl in ("hf", "gdino"):
        print(f"  {NAMES[impl]:26s} steps {', '.join(f'{t:.1f}' for t in report[impl]['times_s'])} s")
    (t_hf, m_hf), (t_ours, m_ours) = rows["hf"], rows["gdino"]
    print(f"  speed-up {t_hf / t_ours:.2f}x, memory ratio {m_ours / m_hf:.2f} (ours / reference)")


if __name__ == "__main__":
    sys.exit(main())
