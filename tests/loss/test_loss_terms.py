"""The loss terms one by one, on small hand-made inputs (the full-model parity is test_loss.py)."""

from __future__ import annotations

import pytest
import torch

from gdino.loss.criterion import (
    box_losses,
    cardinality_error,
    classification_loss,
    make_targets,
    phrase_token_maps,
    sigmoid_focal_loss,
)
from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS
from gdino.utils.boxes import cxcywh_to_xyxy, generalized_box_iou

pytest.importorskip("scipy")

# [CLS] a cat . a remote control . [SEP] / [CLS] dog ? ? red car . [SEP] [PAD] [PAD]
IDS = torch.tensor(
    [
        [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102],
        [101, 3899, 1029, 1029, 2417, 2482, 1012, 102, 0],
    ]
)


def test_phrases_are_the_runs_between_special_tokens_as_transformers_splits_them():
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    maps = phrase_token_maps(IDS, SPECIAL_TOKEN_IDS, 12)
    assert [m.shape for m in maps] == [(2, 12), (2, 12)]
    assert maps[0][1].nonzero().flatten().tolist() == [4, 5, 6]  # "a remote control"
    assert maps[1][0].nonzero().flatten().tolist() == [1]  # "dog" (doubled "?" makes no empty phrase)
    reference = build_label_maps(torch.zeros(2, 5, 12), IDS)
    for ours, theirs in zip(maps, reference):
        assert torch.equal(ours, theirs.float())


def test_focal_loss_matches_transformers_and_the_formula():
    from transformers.loss.loss_grounding_dino import sigmoid_focal_loss as reference

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 4
    targets = (torch.rand(50, generator=g) > 0.8).float()
    x = logits.double()
    p = x.sigmoid()
    log_p, log_not_p = torch.nn.functional.logsigmoid(x), torch.nn.functional.logsigmoid(-x)
    by_hand = torch.where(targets > 0, -0.25 * (1 - p) ** 2 * log_p, -0.75 * p**2 * log_not_p).sum() / 3
    assert sigmoid_focal_loss(logits, targets, 3.0, 0.25) == pytest.approx(float(by_hand), rel=1e-5)
    assert sigmoid_focal_loss(logits, targets, 3.0, 0.25) == pytest.approx(
        float(reference(logits, targets, 3)), rel=1e-6
    )


def test_generalized_iou_values():
    from transformers.loss.loss_for_object_detection import generalized_box_iou as reference

    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 0.0, 3.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
    giou = generalized_box_iou(a, b)
    assert giou[0, 0] == pytest.approx(1.0)
    assert giou[0, 1] == pytest.approx(2 / 6)  # IoU 1/3, enclosing box covered by the union
    assert giou[1, 2] == pytest.approx(-23 / 25)  # disjoint: IoU 0, the union covers 2 of the enclosing 25
    assert torch.allclose(giou, reference(a, b), atol=1e-7)
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), b)


def _targets():
    maps = phrase_token_maps(IDS, SPECIAL_TOKEN_IDS, 12)
    labels = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.4]])},
    ]
    return make_targets(labels, maps, torch.device("cpu"))


def test_positive_maps_follow_each_images_own_phrases():
    """A matched query's positives are its target's phrase tokens, in its own prompt's phrase list."""
    targets = _targets()
    assert targets.num_boxes == 3
    logits = torch.zeros(2, 4, 12, requires_grad=True)
    text_mask = torch.zeros(2, 12, dtype=torch.bool)
    text_mask[:, :9] = True
    matches = [(torch.tensor([3]), torch.tensor([0])), (torch.tensor([0, 2]), torch.tensor([1, 0]))]
    classification_loss(logits, matches, targets, text_mask, 0.25).backward()
    positive = logits.grad < 0  # the focal loss pushes positives up
    assert positive[0, 3].nonzero().flatten().tolist() == [4, 5, 6]  # image 0, phrase 1
    assert positive[1, 0].nonzero().flatten().tolist() == [4, 5]  # image 1, phrase 1 "red car"
    assert positive[1, 2].nonzero().flatten().tolist() == [1]  # image 1, phrase 0 "dog"
    assert int(positive.sum()) == 6
    assert (logits.grad[:, :, 9:] == 0).all()  # past the text: no loss


def test_box_losses_values():
    targets = _targets()
    boxes = torch.full((2, 4, 4), 0.5)
    boxes[0, 3] = torch.tensor([0.5, 0.5, 0.2, 0.2])  # exact
    boxes[1, 0] = torch.tensor([0.7, 0.7, 0.2, 0.4])  # exact
    boxes[1, 2] = torch.tensor([0.3, 0.2, 0.1, 0.1])  # shifted by its width: touching, IoU 0
    matches = [(torch.tensor([3]), torch.tensor([0])), (torch.tensor([0, 2]), torch.tensor([1, 0]))]
    l1, giou = box_losses(boxes, matches, targets)
    assert float(l1) == pytest.approx(0.1 / 3)
    # touching boxes: IoU 0, enclosing 0.2 x 0.1 fully covered -> GIoU 0 -> loss 1
    assert float(giou) == pytest.approx(1 / 3, abs=1e-6)
    xyxy = cxcywh_to_xyxy(boxes[1, 2:3])
    assert xyxy.tolist()[0] == pytest.approx([0.25, 0.15, 0.35, 0.25])


def test_cardinality_counts_queries_scoring_above_half():
    targets = _targets()  # 1 and 2 boxes
    logits = torch.full((2, 4, 12), -3.0)
    logits[0, :3, 2] = 1.0  # 3 predicted vs 1
    logits[1, 0, 0] = 1.0  # 1 predicted vs 2
    assert float(cardinality_error(logits, targets)) == pytest.approx((2 + 1) / 2)


@pytest.mark.parametrize(
    "labels,message",
    [
        ([{"class_labels": torch.tensor([2]), "boxes": torch.rand(1, 4)}] * 2, "index the prompt's 2 phrases"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.rand(2, 4)}] * 2, r"must be \(1, 4\)"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}], "1 entries for a batch of 2"),
        ([{"boxes": torch.rand(1, 4)}] * 2, "needs 'class_labels' and 'boxes'"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}] * 2, "w, h >= 0"),
    ],
)
def test_bad_labels_are_explained(labels, message):
    with pytest.raises(ValueError, match=message):
        make_targets(labels, phrase_token_maps(IDS, SPECIAL_TOKEN_IDS, 12), torch.device("cpu"))


def test_no_boxes_in_the_batch_still_gives_a_loss():
    maps = phrase_token_maps(IDS, SPECIAL_TOKEN_IDS, 12)
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    targets = make_targets([empty, empty], maps, torch.device("cpu"))
    assert targets.num_boxes == 1.0  # the divisor never drops below 1
    matches = [(torch.zeros(0, dtype=torch.long),) * 2] * 2
    text_mask = torch.ones(2, 12, dtype=torch.bool)
    loss = classification_loss(torch.full((2, 3, 12), 2.0), matches, targets, text_mask, 0.25)
    assert float(loss) > 0  # every query is pushed towards "nothing here"
    l1, giou = box_losses(torch.rand(2, 3, 4), matches, targets)
    assert float(l1) == 0 and float(giou) == 0


def test_a_positive_map_in_the_labels_replaces_the_prompts_phrases():
    """Grounding captions give their phrases' tokens (the data loader's ``positive_map``)."""
    maps = phrase_token_maps(IDS, SPECIAL_TOKEN_IDS, 12)
    grounding = torch.zeros(1, 12)
    grounding[0, 5:7] = 1.0  # "remote control" inside the phrase "a remote control"
    labels = [
        {"class_labels": torch.tensor([0]), "boxes": torch.rand(1, 4), "positive_map": grounding},
        {"class_labels": torch.tensor([1]), "boxes": torch.rand(1, 4)},
    ]
    targets = make_targets(labels, maps, torch.device("cpu"))
    assert targets.token_maps[0][0].nonzero().flatten().tolist() == [5, 6]
    assert targets.token_maps[1][0].nonzero().flatten().tolist() == [4, 5]
    labels[0]["positive_map"] = torch.zeros(1, 12)
    with pytest.raises(ValueError, match="tokens in every row"):
        make_targets(labels, maps, torch.device("cpu"))
