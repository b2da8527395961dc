"""The README's Python blocks, the model card's snippet among them, run as written.

The hub id resolves through a pre-filled hub cache holding a small test checkpoint, offline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reference import prefill_hub_cache

ROOT = Path(__file__).parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def hub_env(small_dir, tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("hub")
    prefill_hub_cache(small_dir, cache, "IDEA-Research/grounding-dino-tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_readme_has_the_snippet_and_detect():
    assert len(BLOCKS) == 3
    assert "from gdino import AutoProcessor, AutoModelForZeroShotObjectDetection" in BLOCKS[0]
    assert ".detect(" in BLOCKS[1]


@pytest.mark.slow  # a fresh interpreter runs the README
def test_model_card_snippet_runs(hub_env):
    check = "\nassert outputs.logits.shape == (1, model.config.num_queries, 256)"
    check += "\nassert set(results[0]) >= {'scores', 'boxes', 'labels'}\nprint('ok', len(results[0]['scores']))"
    result = _run(BLOCKS[0] + check, hub_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.slow  # a fresh interpreter runs the README
def test_detect_example_runs(hub_env):
    result = _run(BLOCKS[1] + "\nassert isinstance(found, list) and len(found) == 2\nprint('ok')", hub_env)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_training_loss_example_runs(hub_env):
    """The loss example, after the model card's snippet (which defines model, processor and image)."""
    check = "\nassert torch.isfinite(outputs.loss) and 'loss_giou_enc' in outputs.loss_dict\nprint('ok')"
    result = _run(BLOCKS[0] + BLOCKS[2] + check, hub_env)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
