"""Hungarian matching: the least-cost assignment, its costs, and what it does with odd inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from gdino.loss.matcher import MatchCosts, class_cost, hungarian_match, match_cost

pytest.importorskip("scipy")


def _problem(seed: int, queries: int = 6, targets: int = 3, width: int = 8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, queries, width, generator=g) * 3
    centres = torch.rand(1, queries, 2, generator=g) * 0.6 + 0.2
    boxes = torch.cat([centres, torch.rand(1, queries, 2, generator=g) * 0.3 + 0.05], -1)
    maps = torch.zeros(targets, width)
    for t in range(targets):
        maps[t, t : t + 2] = 0.5  # each target's phrase: two tokens
    target_boxes = torch.cat([torch.rand(targets, 2, generator=g) * 0.6 + 0.2, torch.full((targets, 2), 0.2)], -1)
    return logits, boxes, maps, target_boxes


@pytest.mark.parametrize("seed", range(5))
def test_matching_is_the_least_cost_assignment(seed):
    logits, boxes, maps, target_boxes = _problem(seed)
    costs = MatchCosts()
    ((rows, cols),) = hungarian_match(logits, boxes, [maps], [target_boxes], costs)
    cost = match_cost(logits[0], boxes[0], maps, target_boxes, costs)
    best = min(sum(cost[q, t].item() for t, q in enumerate(perm)) for perm in itertools.permutations(range(6), 3))
    assert sorted(cols.tolist()) == [0, 1, 2]
    assert rows.tolist() == sorted(rows.tolist())
    assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_costs_are_weighted_focal_l1_and_giou():
    logits, boxes, maps, target_boxes = _problem(0)
    prob = logits[0].sigmoid()
    focal = 0.25 * (1 - prob) ** 2 * -torch.log(prob + 1e-8) - 0.75 * prob**2 * -torch.log(1 - prob + 1e-8)
    expected_class = focal @ maps.t()  # each target's phrase tokens, averaged
    assert torch.allclose(class_cost(logits[0], maps), expected_class, atol=1e-6)
    only_l1 = match_cost(logits[0], boxes[0], maps, target_boxes, MatchCosts(0.0, 1.0, 0.0))
    assert torch.allclose(only_l1, (boxes[0, :, None] - target_boxes[None]).abs().sum(-1), atol=1e-6)
    same = target_boxes[:1].expand(1, 3, 4).clone()
    only_giou = match_cost(logits[0, :3], same[0], maps[:1], target_boxes[:1], MatchCosts(0.0, 0.0, 1.0))
    assert torch.allclose(only_giou, torch.full((3, 1), -1.0))  # identical boxes: GIoU 1


def test_the_class_cost_alone_picks_the_query_that_scores_the_phrase():
    logits = torch.full((1, 4, 6), -5.0)
    logits[0, 2, 3:5] = 5.0  # query 2 is sure of tokens 3 and 4
    maps = torch.zeros(1, 6)
    maps[0, 3:5] = 0.5
    boxes = torch.full((1, 4, 4), 0.5)
    ((rows, cols),) = hungarian_match(logits, boxes, [maps], [torch.full((1, 4), 0.5)], MatchCosts(1.0, 0.0, 0.0))
    assert rows.tolist() == [2] and cols.tolist() == [0]


def test_an_image_without_targets_matches_nothing():
    logits, boxes, maps, target_boxes = _problem(1)
    matches = hungarian_match(
        torch.cat([logits, logits]),
        torch.cat([boxes, boxes]),
        [maps, maps[:0]],
        [target_boxes, target_boxes[:0]],
        MatchCosts(),
    )
    assert len(matches[0][0]) == 3
    assert matches[1][0].numel() == 0 and matches[1][1].numel() == 0


def test_non_finite_predictions_are_matched_last():
    logits, boxes, maps, target_boxes = _problem(2, queries=4, targets=1)
    boxes[0, 1] = float("nan")
    logits[0, 1] = 50.0  # would win the class cost if NaN did not rank last
    ((rows, _),) = hungarian_match(logits, boxes, [maps[:1]], [target_boxes], MatchCosts())
    assert rows.tolist() != [1]
