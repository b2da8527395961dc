"""Shared fixtures. The full-size parity checkpoint (690 MB) is built once per test run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reference import DATA, build_reference, save_reference


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


@pytest.fixture(scope="session")
def reference_model():
    """transformers' implementation, grounding-dino-tiny architecture, seeded test weights."""
    with torch.no_grad():
        return build_reference()


@pytest.fixture(scope="session")
def parity_dir(reference_model, tmp_path_factory) -> Path:
    """The reference weights saved in the Hugging Face layout, with processor and vocabulary."""
    return save_reference(reference_model, tmp_path_factory.mktemp("grounding-dino-tiny-test"))


@pytest.fixture(scope="session")
def our_model(parity_dir):
    from gdino import AutoModelForZeroShotObjectDetection

    return AutoModelForZeroShotObjectDetection.from_pretrained(parity_dir)


@pytest.fixture(scope="session")
def our_processor(parity_dir):
    from gdino import AutoProcessor

    return AutoProcessor.from_pretrained(parity_dir)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def small_reference():
    """transformers' implementation in a small configuration with seeded test weights."""
    from reference import small_reference_config

    with torch.no_grad():
        return build_reference(small_reference_config(), seed=1)


@pytest.fixture(scope="session")
def small_dir(small_reference, tmp_path_factory) -> Path:
    """The small reference saved in the Hugging Face layout (for fast tests of loading and apps)."""
    return save_reference(small_reference, tmp_path_factory.mktemp("small-hf"))


@pytest.fixture(scope="module")
def small_model(small_dir):
    """gdino's model on ``small_dir``, in eval mode: one per test module, so no module sees another's changes."""
    from gdino import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection.from_pretrained(small_dir).eval()


@pytest.fixture(scope="module")
def fast_model(fast_dir):
    """gdino's model on ``fast_dir`` (160-pixel images), in eval mode, one per test module."""
    from gdino import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection.from_pretrained(fast_dir).eval()


@pytest.fixture(scope="session")
def fast_dir(small_dir, tmp_path_factory) -> Path:
    """``small_dir`` with images resized to 160 pixels on the short side (256 at most): for apps' tests."""
    import json

    directory = tmp_path_factory.mktemp("small-fast")
    for f in small_dir.iterdir():
        (directory / f.name).symlink_to(f)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (directory / name).exists():
            config = json.loads((small_dir / name).read_text())
            settings = config.get("image_processor", config)
            settings["size"] = {"shortest_edge": 160, "longest_edge": 256}
            (directory / name).unlink()
            (directory / name).write_text(json.dumps(config))
    return directory
