"""``gdino models``: the family's published checkpoints, with sizes computed from their architectures."""

from __future__ import annotations

import json

from gdino.checkpoint.catalog import KNOWN_MODELS, known_model
from gdino.models.grounding_dino.config import GroundingDinoConfig


def test_sizes_are_the_published_ones() -> None:
    """The presets' parameter counts match the model cards (grounding-dino-tiny 172M; the others
    as the hub lists them: base 0.2B (233M), LLMDet tiny 173M, large 0.3B)."""
    counts = {m.name: m.parameters() / 1e6 for m in KNOWN_MODELS}
    assert round(counts["IDEA-Research/grounding-dino-tiny"], 1) == 172.2
    assert 230 < counts["IDEA-Research/grounding-dino-base"] < 235
    assert 172 < counts["iSEE-Laboratory/llmdet_tiny"] < 174
    assert 340 < counts["openmmlab-community/mm_grounding_dino_large_all"] < 350


def test_presets_are_each_familys_architecture() -> None:
    base, large = known_model("IDEA-Research/grounding-dino-base"), known_model("iSEE-Laboratory/llmdet_large")
    assert base is not None and large is not None
    assert base.preset().swin.window_size == 12 and base.preset().model_type == "grounding-dino"
    config = large.preset()
    assert (config.model_type, config.num_feature_levels, config.share_box_heads) == ("mm-grounding-dino", 5, False)
    assert GroundingDinoConfig.from_hf_dict(config.to_hf_dict()) == config
    assert known_model("someone/else") is None
    assert len({m.name for m in KNOWN_MODELS}) == len(KNOWN_MODELS) == 13


def test_gdino_models_lists_them(capsys) -> None:
    from gdino.apps.cli import main

    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert all(m.name in table for m in KNOWN_MODELS) and "LVIS minival 51.1" in table
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == [m.name for m in KNOWN_MODELS]
    assert rows[0]["parameters_m"] == 172.2 and "transformers" in rows[0]["checked_against"]
