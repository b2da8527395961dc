"""Training through ``model(**inputs, labels=...)``: the loss falls, and inference is unchanged."""

from __future__ import annotations

import pytest
import torch

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino

pytest.importorskip("scipy")

IDS = torch.tensor([[101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]])  # "a cat. a remote control."
LABELS = [{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.7, 0.7, 0.2, 0.2]])}]


def _model(cls=GroundingDinoForObjectDetection):
    torch.manual_seed(0)
    return cls(GroundingDinoConfig.small_test())


def _pixels() -> torch.Tensor:
    return torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(0))


def test_a_few_steps_on_one_image_lower_the_loss():
    model = _model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    losses = []
    for _ in range(8):
        out = model(pixel_values=_pixels(), input_ids=IDS, labels=LABELS)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses
    assert set(out.loss_dict) == {
        f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error") for s in ("", "_enc")
    }


def test_the_encoder_loss_trains_the_proposal_head():
    model = _model()
    out = model(pixel_values=_pixels(), input_ids=IDS, labels=LABELS)
    out.loss_dict["loss_bbox_enc"].backward()
    head = model.transformer
    for part in (head.enc_output, head.enc_output_norm, head.enc_out_bbox_embed):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.bbox_embed.layers[0].weight.grad is None  # the decoder's head is not in that term


def test_auxiliary_losses_name_every_decoder_layer_but_the_last():
    import dataclasses

    model = _model()
    model.config = dataclasses.replace(model.config, auxiliary_loss=True)
    out = model(pixel_values=_pixels(), input_ids=IDS, labels=LABELS)
    assert "loss_ce_0" in out.loss_dict and "loss_ce_1" not in out.loss_dict  # 2 decoder layers
    weighted = sum(
        out.loss_dict[f"loss_{k}{s}"] * w
        for k, w in (("ce", 2.0), ("bbox", 5.0), ("giou", 2.0))
        for s in ("", "_0", "_enc")
    )
    assert float(out.loss) == pytest.approx(float(weighted), rel=1e-6)


def test_without_labels_nothing_extra_is_computed():
    model = _model().eval()
    with torch.no_grad():
        plain = model(pixel_values=_pixels(), input_ids=IDS)
        full = model(pixel_values=_pixels(), input_ids=IDS, intermediate=True)
    assert plain.loss is None and plain.decoder_logits is None and plain.encoder_logits is None
    assert torch.equal(full.logits, plain.logits) and torch.equal(full.pred_boxes, plain.pred_boxes)
    assert full.decoder_logits.shape == (2, 1, 50, 256) and full.encoder_pred_boxes.shape == (1, 50, 4)


def test_the_bare_model_refuses_labels():
    """Only GroundingDinoForObjectDetection computes the loss; the bare model does not take labels."""
    with pytest.raises(TypeError, match="labels"):
        _model(GroundingDino)(pixel_values=_pixels(), input_ids=IDS, labels=LABELS)
