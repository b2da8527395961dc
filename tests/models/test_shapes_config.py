"""The shapes preset: the model family, small, and it runs a forward and backward at the training size."""

from __future__ import annotations

import pytest
import torch

from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino


@pytest.mark.slow  # training steps
def test_shapes_preset_builds_round_trips_and_trains_at_256():
    config = GroundingDinoConfig.shapes()
    assert config.text.vocab_size == 30522 and config.max_text_len == 256  # same vocabulary and prompt limit
    assert GroundingDinoConfig.from_hf_dict(config.to_hf_dict()) == config
    torch.manual_seed(0)
    model = GroundingDino(config).train()
    parameters = sum(p.numel() for p in model.parameters())
    assert 3e6 < parameters < 6e6, parameters
    ids = torch.tensor([[101, 2417, 4418, 1012, 2630, 2675, 1012, 102]])  # red circle. blue square.
    pixels = torch.randn(1, 3, 256, 320)
    out = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (1, 100, 256) and out.pred_boxes.shape == (1, 100, 4)
    assert torch.isinf(out.logits[0, :, 8:]).all() and torch.isfinite(out.logits[0, :, :8]).all()
    (out.logits[..., :8].sigmoid().mean() + out.pred_boxes.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.8 * len(grads)
