"""Training the shapes segmenter: prompts and targets, the losses, the schedule, saving in the layout
``load_sam2`` and ``Segmenter`` read, and a few steps that fit one batch."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from gdino.checkpoint.sam2_loading import load_sam2
from gdino.inference.segmenter import Segmenter
from gdino.models.sam2.config import HieraConfig, MaskDecoderConfig, Sam2Config
from gdino.models.sam2.model import Sam2
from gdino.training.segmenter import (
    SegmenterTrainSettings,
    dice_loss,
    focal_loss,
    learning_rate,
    losses,
    mask_iou,
    save_segmenter,
    settings_record,
)
from gdino.training.segmenter_data import jitter_boxes, make_batch, split_scenes, to_input_boxes
from gdino.training.segmenter_eval import iou, scene_ious
from gdino.training.shapes import ShapesSettings


def tiny() -> Sam2Config:
    hiera = HieraConfig(
        embed_dims=(8, 16, 32, 64),
        num_heads=(1, 1, 1, 2),
        stages=(1, 1, 1, 1),
        global_att_blocks=(2,),
        window_spec=(4, 4, 4, 4),
    )
    decoder = MaskDecoderConfig(num_heads=2, mlp_dim=64, iou_head_hidden_dim=32, dynamic_multimask_via_stability=False)
    return Sam2Config(hiera=hiera, decoder=decoder, image_size=64, d_model=32)


SETTINGS = ShapesSettings(image_size=(64, 96), objects=(1, 3), radius=(0.15, 0.3), backgrounds=("flat", "gradient"))


def test_the_shapes_preset_builds_and_round_trips_its_config_json():
    config = Sam2Config.shapes()
    assert config.image_size == 256 and config.feature_sizes == (64, 32, 16)
    assert not config.decoder.dynamic_multimask_via_stability
    assert Sam2Config.from_hf_dict(json.loads(json.dumps(config.to_hf_dict()))) == config
    assert 1.5e6 < sum(p.numel() for p in Sam2(config).parameters()) < 4e6


def test_losses_are_zero_for_a_perfect_mask_and_large_for_its_opposite():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    perfect, wrong = (target * 2 - 1) * 20, (1 - 2 * target) * 20
    assert float(dice_loss(perfect, target).max()) < 1e-3 < 0.99 < float(dice_loss(wrong, target).min())
    assert float(focal_loss(perfect, target).max()) < 1e-6 < 1.0 < float(focal_loss(wrong, target).min())
    half = perfect.clone()
    half[:, :, :8] = -20  # half the square left out: IoU 1/2
    assert torch.allclose(mask_iou(half, target), torch.tensor([0.5, 0.5]))
    assert float(mask_iou(perfect, target).min()) == 1.0


def test_learning_rate_warms_up_then_decays_to_its_floor():
    s = SegmenterTrainSettings(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(0.0, 0, s) == pytest.approx(1e-4)
    assert learning_rate(0.0, 20, s) == pytest.approx(1e-3)
    assert learning_rate(0.5, 20, s) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(1.0, 500, s) == pytest.approx(1e-4)


def test_box_noise_is_bounded_and_boxes_stay_in_the_image():
    boxes = np.array([[10, 10, 50, 30], [0, 0, 200, 100]], np.float32)
    rng = np.random.default_rng(0)
    moved = np.stack([jitter_boxes(boxes, rng, 200, 100, 0.1, 5.0) for _ in range(200)])  # (200, 2, 4)
    assert np.abs(moved - boxes).max() <= 5.0 + 1e-4 and moved.std(0).mean() > 1.0
    assert (moved[..., 0] >= 0).all() and (moved[..., 2] <= 200).all() and (moved[..., 3] <= 100).all()
    assert (moved[..., 2:] > moved[..., :2]).all()
    assert np.allclose(to_input_boxes(boxes, 200, 100, 64)[1], [0, 0, 64, 64])


def test_a_batch_holds_every_object_and_pads_with_weight_zero():
    scenes = split_scenes("train", 0, 6, 0, SETTINGS, [])
    batch = make_batch(scenes[:3], 64, None)
    counts = [len(s.pairs) for s in scenes[:3]]
    p = max(counts)
    assert batch.pixels.shape == (3, 3, 64, 64) and batch.boxes.shape == (3, p, 4)
    assert batch.weights.sum(1).tolist() == counts
    for b, scene in enumerate(scenes[:3]):
        h, w = scene.image.shape[:2]
        covered = batch.targets[b, : counts[b]].sum((1, 2)).numpy()  # (n,) target pixels of the 64 x 64 input
        assert np.allclose(covered, scene.masks.sum((1, 2)) * 64 * 64 / (h * w), rtol=0.02)
        assert torch.allclose(batch.boxes[b, : counts[b]], torch.from_numpy(to_input_boxes(scene.boxes, w, h, 64)))
        everything = batch.targets[b, : counts[b]].sum(0).clamp(max=1)  # (64, 64) all objects
        assert torch.allclose(batch.others[b, : counts[b]] + batch.targets[b, : counts[b]], everything, atol=1e-5)


@pytest.mark.slow  # 30 training steps (about 11 s on 2 busy cores)
def test_a_few_steps_fit_one_batch():
    torch.manual_seed(0)
    model = Sam2(tiny()).train()
    batch = make_batch(split_scenes("train", 0, 4, 0, SETTINGS, []), 64, None)
    settings = SegmenterTrainSettings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        terms = losses(model, batch, settings)
        first = first if first is not None else {k: float(v.detach()) for k, v in terms.items()}
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    last = {k: float(v) for k, v in losses(model, batch, settings).items()}
    assert last["total"] < 0.7 * first["total"] and last["dice"] < first["dice"] - 0.1
    assert last["mask_iou"] > first["mask_iou"] + 0.1


def test_saved_model_loads_strictly_and_segments_through_segmenter(tmp_path):
    torch.manual_seed(1)
    model = Sam2(tiny()).eval()
    save_segmenter(model, tmp_path, settings_record(SegmenterTrainSettings(steps=3)))
    assert json.loads((tmp_path / "training.json").read_text())["steps"] == 3
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 64, "width": 64} and processor["mask_size"] == {"height": 16, "width": 16}
    loaded = load_sam2(tmp_path)
    pixels, boxes = torch.randn(1, 3, 64, 64), torch.tensor([[[4.0, 8.0, 40.0, 50.0]]])
    with torch.no_grad():
        a, b = model(pixels, boxes=boxes, multimask_output=False), loaded(pixels, boxes=boxes, multimask_output=False)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)
    segmenter = Segmenter.from_pretrained(tmp_path)
    assert segmenter.settings.size == 64
    scenes = split_scenes("val", 0, 2, 0, SETTINGS, [])
    ious = scene_ious(segmenter, scenes)
    assert len(ious) == sum(len(s.pairs) for s in scenes) and all(0.0 <= v <= 1.0 for v in ious)
    masks, _ = segmenter.segment(scenes[0].image, scenes[0].boxes)
    assert ious[0] == pytest.approx(iou(masks.mask(0), scenes[0].masks[0]))


def test_iou_of_masks():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(1 / 3) and iou(a, a) == 1.0 and iou(a & False, b & False) == 1.0
    assert replace(SETTINGS, objects=(1, 1)).objects == (1, 1)
