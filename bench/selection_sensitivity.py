"""How much rounding the query selection of a checkpoint tolerates, in float32.

    python bench/selection_sensitivity.py                      # the random-weight tiny checkpoint
    python bench/selection_sensitivity.py --model DIR --image PATH --prompt TEXT

Runs our float32 model once as it is, then again with seeded Gaussian noise of a given relative
size added to the feature enhancer's image output (the tokens query selection ranks), and
compares the top 100 queries as bench/compare.py does (tests/agreement.py). bfloat16 rounds at a
relative 2**-9 (about 2e-3) per operation, so the noise levels bracket what reduced precision
does. Also prints how far apart the selection scores are around the 900 selected.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from compare import DEFAULT_IMAGE, DEFAULT_PROMPT, ensure_model  # noqa: E402

from agreement import match_top_queries, selection_overlap  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint directory (default: the bench's random tiny one)")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--noise", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from PIL import Image

    from gdino import AutoModelForZeroShotObjectDetection, AutoProcessor

    directory = args.model or ensure_model("tiny")
    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory).eval()
    inputs = AutoProcessor.from_pretrained(directory)(images=Image.open(args.image), text=args.prompt)
    encoder = model.transformer.encoder
    run_encoder = encoder.forward
    noise = {"relative": 0.0}

    def noisy_encoder(*a, **k):
        memory, text = run_encoder(*a, **k)
        if noise["relative"]:
            g = torch.Generator().manual_seed(1)
            memory = memory + torch.randn(memory.shape, generator=g) * memory.std() * noise["relative"]
        return memory, text

    encoder.forward = noisy_encoder
    with torch.inference_mode():
        base = model(**inputs)
        scores = _selection_scores(model, inputs)
        q = model.config.num_queries
        gaps = scores[:q] - scores[1 : q + 1]
        print(
            f"selection scores: best {scores[0]:.3f}, #{q} {scores[q - 1]:.3f}; gap between neighbours "
            f"in the top {q}: median {gaps.median():.1e}, smallest {gaps.min():.1e}; "
            f"#{q} to #{q + 1}: {scores[q - 1] - scores[q]:.1e}"
        )
        print(
            "| relative noise | min IoU | max score diff | same slot (top 100) "
            "| selected tokens shared | same slot (900) |"
        )
        print("|---|---|---|---|---|---|")
        for level in args.noise:
            noise["relative"] = level
            out = model(**inputs)
            a = match_top_queries(base.logits, base.pred_boxes, out.logits, out.pred_boxes)
            s = selection_overlap(base.query_index, out.query_index)
            print(
                f"| {level:.0e} | {a['min_iou']:.3f} | {a['max_score_diff']:.4f} | {a['same_query']}/{a['pairs']} "
                f"| {s['shared_tokens']}/{s['queries']} | {s['same_slot']}/{s['queries']} |",
                flush=True,
            )
    return 0


def _selection_scores(model, inputs) -> torch.Tensor:
    """The scores query selection ranks (``query_selection.proposal_scores``) for image 0, sorted."""
    from gdino.models.grounding_dino import query_selection

    captured = {}
    score = query_selection.proposal_scores

    def spy(*args):
        tokens, scores = score(*args)
        captured["scores"] = scores[0].sort(descending=True).values
        return tokens, scores

    query_selection.proposal_scores = spy
    try:
        model(**inputs)
    finally:
        query_selection.proposal_scores = score
    return captured["scores"]


if __name__ == "__main__":
    sys.exit(main())
