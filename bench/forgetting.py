"""The forgetting benchmark in one command: fine-tune ``gdino-shapes`` on new concepts by each method and
score what it learned and what it kept.

    python bench/forgetting.py --out out-forget                      # every method, full size
    python bench/forgetting.py --out out-forget --methods plain,replay
    python bench/forgetting.py --out out-smoke --quick               # tiny sizes, to check that it runs

Writes the benchmark's data (``gdino.training.forgetting_data``) into ``OUT/data``, runs ``gdino
train`` once per method into ``OUT/<method>`` (a subprocess each, the command a user would type, its
log in ``OUT/<method>.log``), scores the base model and every result with
``gdino.training.forgetting.score_forgetting`` (mean per-pair AP50 on never-seen images: ``new``
concepts, old ``seen`` pairs, old ``held_out`` pairs), and for ``wise`` merges the plain fine-tune
into the base at each ``--alphas`` with ``gdino merge`` and keeps the alpha the targets choose. The
figures go to ``OUT/results.json`` as they come, so a rerun skips what is done; the table at the end
is the README's. Training time is wall clock of ``gdino train`` (pseudo-labelling included).
Targets (issue #25): new >= 0.8, seen loss <= 0.03, held-out loss <= 0.05 against the base model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gdino import GroundingDinoForObjectDetection
from gdino.training.forgetting import ForgettingScores, score_forgetting
from gdino.training.forgetting_data import DEFAULT_COUNTS, write_forgetting_dataset

TARGETS = {"new": 0.8, "seen_loss": 0.03, "held_out_loss": 0.05}
QUICK_COUNTS = {"train": 24, "new": 12, "val": 12, "held_out": 12}
# Each method's own options on top of the common ones; wise reuses plain's checkpoint.
METHODS: dict[str, list[str]] = {
    "plain": [],
    "replay": ["--replay"],
    "distill": ["--distill", "5"],
    "lora": ["--lora-rank", "16"],
    "replay+lora": ["--replay", "--lora-rank", "16"],
}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the data, runs and results.json")
    parser.add_argument("--model", default="gdino-shapes", help="the base model (default gdino-shapes)")
    parser.add_argument(
        "--methods", default="plain,replay,distill,lora,wise", help="comma list of " + ",".join([*METHODS, "wise"])
    )
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument(
        "--lr-text",
        type=float,
        default=None,
        help="BERT's learning rate (default: --lr; the new words' embeddings must move, lr/10 learns them slowly)",
    )
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="learning rate of the LoRA methods (adapters only)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument(
        "--alphas", default="0.3,0.5,0.7,0.8,0.9", help="WiSE-FT alphas to score (share of the tuned model)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=15, help="each training run's limit")
    parser.add_argument(
        "--quick", action="store_true", help="tiny data and one epoch: checks that it runs, figures mean nothing"
    )
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != "wise"]
    if unknown:
        raise SystemExit(f"bench/forgetting.py: unknown method(s) {unknown}; known: {[*METHODS, 'wise']}")
    if "wise" in methods and "plain" not in methods:
        methods.insert(methods.index("wise"), "plain")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "held_out.json").is_file():
        write_forgetting_dataset(data, QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    results = Results(args.out / "results.json")
    base = results.get("base") or results.put("base", {"scores": score(args.model, data), "seconds": 0.0})
    for method in methods:
        if method == "wise":
            wise(args, results, data, base)
        elif results.get(method) is None:
            seconds = train(args, method, data)
            results.put(method, {"scores": score(str(last_checkpoint(args.out / method)), data), "seconds": seconds})
    print_table(results.all(), base)


class Results:
    """``results.json``: one entry per method, written after each so a rerun skips what is done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, name: str) -> dict[str, Any] | None:
        return self.entries.get(name)

    def put(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        self.entries[name] = entry
        self.path.write_text(json.dumps(self.entries, indent=1) + "\n")
        print(f"forgetting: {name}: {entry}", flush=True)
        return entry

    def all(self) -> dict[str, Any]:
        return dict(self.entries)


def train_command(args: argparse.Namespace, method: str, data: Path) -> list[str]:
    lora = "--lora-rank" in METHODS[method]
    command = [sys.executable, "-m", "gdino", "train", "--data", str(data / "train.json"), "--model", args.model]
    command += ["--out", str(args.out / method), "--overwrite", "--epochs", "1" if args.quick else str(args.epochs)]
    lr = args.lora_lr if lora else args.lr
    command += ["--batch-size", str(args.batch_size), "--lr", str(lr), "--lr-text", str(args.lr_text or lr)]
    command += ["--schedule", "cosine", "--image-size", str(args.image_size), "--no-augment"]
    command += ["--max-labels", "24", "--denoise", "100", "--max-minutes", str(args.max_minutes)]
    return command + METHODS[method]


def train(args: argparse.Namespace, method: str, data: Path) -> float:
    command = train_command(args, method, data)
    print("forgetting: " + " ".join(command[1:]), flush=True)
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with open(args.out / f"{method}.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench/forgetting.py: {method} failed (exit {done.returncode}); see {args.out / method}.log")
    return round(time.perf_counter() - start, 1)


def last_checkpoint(run: Path) -> Path:
    """The run's final checkpoint: its highest epoch-N, or ``last`` when it stopped mid-epoch."""
    epochs = sorted(run.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1]))
    last = run / "last"
    if last.is_dir() and (not epochs or last.stat().st_mtime > epochs[-1].stat().st_mtime):
        return last
    if not epochs:
        raise SystemExit(f"bench/forgetting.py: no checkpoint in {run}")
    return epochs[-1]


def score(model: str, data: Path) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = GroundingDinoForObjectDetection.from_pretrained(model)
        scores: ForgettingScores = score_forgetting(loaded, data, log=io.StringIO())
    return scores.as_dict()


def wise(args: argparse.Namespace, results: Results, data: Path, base: dict[str, Any]) -> None:
    """Merges plain's checkpoint into the base at each alpha, scores each, keeps the one the targets choose."""
    tuned = last_checkpoint(args.out / "plain")
    plain = results.get("plain")
    seconds = plain["seconds"] if plain else 0.0
    for alpha in [float(a) for a in args.alphas.split(",")]:
        name = f"wise-{alpha:g}"
        if results.get(name) is not None:
            continue
        out = args.out / name
        if out.exists():
            shutil.rmtree(out)  # a merge cut short by a kill: merge wants a new folder
        command = [
            sys.executable,
            "-m",
            "gdino",
            "merge",
            args.model,
            str(tuned),
            "--alpha",
            str(alpha),
            "--out",
            str(out),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results.put(name, {"scores": score(str(out), data), "seconds": seconds, "alpha": alpha})
    candidates = {k: v for k, v in results.all().items() if k.startswith("wise-")}
    best = max(candidates, key=lambda k: rank(candidates[k]["scores"], base["scores"]))
    results.put("wise", candidates[best] | {"chosen": best})


def rank(scores: dict[str, float], base: dict[str, float]) -> tuple[bool, float]:
    """Within the keep targets first, then the highest new-concept AP50 (else the best mean of the three)."""
    kept = meets_keep(scores, base)
    return kept, scores["new"] if kept else (scores["new"] + scores["seen"] + scores["held_out"]) / 3


def meets_keep(scores: dict[str, float], base: dict[str, float]) -> bool:
    return (
        base["seen"] - scores["seen"] <= TARGETS["seen_loss"]
        and base["held_out"] - scores["held_out"] <= TARGETS["held_out_loss"]
    )


def print_table(entries: dict[str, Any], base: dict[str, Any]) -> None:
    b = base["scores"]
    print("\n| method | new AP50 | seen AP50 (change) | held-out AP50 (change) | training time | targets |")
    print("|---|---|---|---|---|---|")
    for name, entry in entries.items():
        if name.startswith("wise-"):
            continue
        s = entry["scores"]
        label = f"wise ({entry['chosen']})" if name == "wise" else name
        met = "base" if name == "base" else ("yes" if s["new"] >= TARGETS["new"] and meets_keep(s, b) else "no")
        seen, held = (
            f"{s['seen']:.3f} ({s['seen'] - b['seen']:+.3f})",
            f"{s['held_out']:.3f} ({s['held_out'] - b['held_out']:+.3f})",
        )
        print(f"| {label} | {s['new']:.3f} | {seen} | {held} | {entry['seconds']:.0f} s | {met} |")


if __name__ == "__main__":
    main()
