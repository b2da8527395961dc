"""Contrastive denoising training (DINO's CDN, after DN-DETR), for grounding prompts.

Besides the queries that are matched to the targets, the decoder gets noised copies of the target
boxes whose answers are known without matching: a *positive* copy (each box edge moved by less
than ``box_noise`` x half the box's size) must be refined back to its target box and scored on
its target's phrase; a *negative* copy (moved by between one and two times that) must score no
phrase at all, which teaches the model to reject near-duplicates. This gives the decoder many more
positive examples per step and a stable target to refine towards, the known cure for DETR's slow
convergence (DN-DETR, DINO).

Open-vocabulary detection has no class table to embed, so a copy's content query is the enhanced
text averaged over its phrase's tokens; with probability ``label_noise / 2`` it is another phrase
of the same prompt (the target stays the true phrase). Nothing here has parameters, so a model
trained with denoising saves and loads exactly as one trained without.

The copies come in groups (each group one positive and one negative copy of every target of the
batch's most-annotated image); groups see only themselves and the matching queries, and the
matching queries never see them (``gdino.models.grounding_dino.transformer.denoise_attention``), so the
matching queries' outputs are unchanged by them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gdino.loss.criterion import (
    Targets,
    loss_weights,
    make_targets,
    paired_box_losses,
    phrase_token_maps,
    prompt_mask,
    sigmoid_focal_loss,
)
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.features import DenoisingQueries
from gdino.models.grounding_dino.model import GroundingDinoOutput
from gdino.utils.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh


@dataclass(frozen=True)
class DenoiseSettings:
    """How many denoising queries, and how noisy.

    Attributes:
        queries: the most denoising queries a step (DINO: 100); groups = queries // (2 x the most
            targets of one image in the batch), at least one.
        box_noise: the edge noise scale (DINO: 1.0; DN-DETR's positive-only boxes used 0.4).
        label_noise: twice the probability that a copy's content is another phrase (DINO: 0.5).
    """

    queries: int = 100
    box_noise: float = 1.0
    label_noise: float = 0.5


@dataclass(frozen=True)
class Denoising:
    """The denoising queries of one batch and what each must answer.

    Attributes:
        queries: what the decoder gets (``DenoisingQueries``).
        token_maps: (B, N, W) 0/1, the phrase tokens each query must score: its target's phrase
            for a positive copy, nothing for a negative one or a padding slot.
        boxes: (B, N, 4) the target box of each query (cx, cy, w, h).
        positive: (B, N) True on positive copies (those with box losses).
        groups: the number of groups.
        num_boxes: the batch's target count (the terms' divisor, times ``groups``).
    """

    queries: DenoisingQueries
    token_maps: Tensor
    boxes: Tensor
    positive: Tensor
    groups: int
    num_boxes: float


def make_denoising(
    input_ids: Tensor,
    labels: Sequence[Mapping[str, Tensor]],
    config: GroundingDinoConfig,
    settings: DenoiseSettings,
    generator: torch.Generator | None = None,
) -> Denoising | None:
    """Noised copies of the batch's targets; None when no image has a target or ``queries`` is 0.

    ``labels`` as the loss takes them (``make_targets``); the noise is drawn from ``generator``
    (torch's global generator when None, so a seeded training run is reproducible).
    """
    width = config.max_text_len
    device = input_ids.device
    targets = make_targets(labels, phrase_token_maps(input_ids, config.special_token_ids, width), device)
    most = max(len(b) for b in targets.boxes)
    if most == 0 or settings.queries <= 0:
        return None
    groups = max(1, settings.queries // (2 * most))
    slots = 2 * most  # per group: `most` positive copies, then `most` negative ones
    batch, n = len(targets.boxes), groups * slots
    content = torch.zeros(batch, n, width, device=device)
    wanted = torch.zeros(batch, n, width, device=device)
    boxes = torch.zeros(batch, n, 4, device=device)
    truth = torch.zeros(batch, n, 4, device=device)
    valid = torch.zeros(batch, n, dtype=torch.bool, device=device)
    positive = torch.zeros(batch, n, dtype=torch.bool, device=device)
    for b in range(batch):
        k = len(targets.boxes[b])
        if not k:
            continue
        where = _slots(groups, most, k, device)  # (G, 2, k) slot of each copy
        flat = where.reshape(-1)  # (G * 2 * k,)
        maps = targets.token_maps[b].repeat(groups * 2, 1)  # (G * 2 * k, W) in the order of ``where``
        negative = torch.zeros(groups, 2, k, dtype=torch.bool, device=device)
        negative[:, 1] = True
        negative = negative.reshape(-1)
        wanted[b, flat] = maps * (~negative)[:, None]
        content[b, flat] = _normalise(_flip_labels(maps, targets, b, settings.label_noise, generator))
        truth[b, flat] = targets.boxes[b].repeat(groups * 2, 1)
        boxes[b, flat] = noised_boxes(truth[b, flat], negative, settings.box_noise, generator)
        valid[b, flat] = True
        positive[b, flat] = ~negative
    queries = DenoisingQueries(content, boxes, valid, _group_mask(groups, slots, device))
    return Denoising(queries, wanted, truth, positive, groups, targets.num_boxes)


def _slots(groups: int, most: int, k: int, device: torch.device) -> Tensor:
    """(G, 2, k): the slot of target j's positive (1 = 0) and negative (1 = 1) copy in group g."""
    g = torch.arange(groups, device=device)[:, None, None] * (2 * most)
    kind = torch.arange(2, device=device)[None, :, None] * most
    return g + kind + torch.arange(k, device=device)[None, None, :]


def _group_mask(groups: int, slots: int, device: torch.device) -> Tensor:
    """(N, N) True within a group."""
    group = torch.arange(groups * slots, device=device) // slots
    return group[:, None] == group[None, :]


def _normalise(maps: Tensor) -> Tensor:
    """Each row's weights summing to 1 (a phrase's tokens averaged)."""
    return maps / maps.sum(-1, keepdim=True).clamp(min=1)


def _flip_labels(
    maps: Tensor, targets: Targets, b: int, label_noise: float, generator: torch.Generator | None
) -> Tensor:
    """``maps`` (M, W) with each row replaced, with probability ``label_noise / 2``, by a random
    phrase of image ``b``'s prompt."""
    phrases = targets.phrases[b]
    if label_noise <= 0 or len(phrases) < 2:
        return maps
    flip = torch.rand(len(maps), generator=generator, device=maps.device) < label_noise / 2
    other = torch.randint(len(phrases), (len(maps),), generator=generator, device=maps.device)
    return torch.where(flip[:, None], phrases[other].to(maps.dtype), maps)


def noised_boxes(boxes: Tensor, negative: Tensor, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """DINO's box noise: every edge of (M, 4) (cx, cy, w, h) boxes moves by ``r`` x half the box's
    width (left, right) or height (top, bottom) x ``scale``, ``|r|`` in [0, 1) for positive copies
    and [1, 2) for ``negative`` (M,) ones, with a random sign; clipped to the image."""
    if scale <= 0:
        return boxes.clone()
    corners = cxcywh_to_xyxy(boxes)  # (M, 4) x0 y0 x1 y1
    half = boxes[:, 2:].repeat(1, 2) / 2  # (M, 4) half w, h, w, h
    sign = torch.randint(0, 2, corners.shape, generator=generator, device=boxes.device) * 2.0 - 1.0
    size = torch.rand(corners.shape, generator=generator, device=boxes.device) + negative[:, None].float()
    moved = (corners + sign * size * half * scale).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(moved)


def denoising_losses(
    logits: Tensor, boxes: Tensor, denoising: Denoising, text_mask: Tensor, config: GroundingDinoConfig
) -> dict[str, Tensor]:
    """The denoising terms of every decoder layer: ``loss_ce_dn`` (focal over the valid copies'
    tokens), ``loss_bbox_dn`` and ``loss_giou_dn`` (the positive copies) for the last layer,
    ``..._dn_{i}`` for layer i < L - 1 when the config asks for auxiliary losses; each divided by
    the target count times the number of groups.

    Args:
        logits: (L, B, N, W); boxes: (L, B, N, 4); text_mask: (B, W) True on the prompt's tokens.
    """
    divisor = denoising.num_boxes * denoising.groups
    keep = denoising.queries.valid[:, :, None] & text_mask[:, None, :]  # (B, N, W)
    positive = denoising.positive
    wanted = denoising.boxes[positive]  # (M, 4)
    layers = logits.shape[0]
    terms: dict[str, Tensor] = {}
    for i in range(layers):
        if i < layers - 1 and not config.auxiliary_loss:
            continue
        suffix = "_dn" if i == layers - 1 else f"_dn_{i}"
        terms["loss_ce" + suffix] = sigmoid_focal_loss(
            logits[i][keep], denoising.token_maps.to(logits.dtype)[keep], divisor, config.focal_alpha
        )
        l1, giou = paired_box_losses(boxes[i][positive], wanted, divisor)
        terms["loss_bbox" + suffix], terms["loss_giou" + suffix] = l1, giou
    return terms


def denoising_loss(
    outputs: GroundingDinoOutput,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    denoising: Denoising,
    config: GroundingDinoConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The denoising terms of a forward that decoded ``denoising``'s queries, and their sum with
    the weights of the matching terms (``loss_ce_dn`` as ``loss_ce``...), to add to the loss."""
    if outputs.denoise_logits is None or outputs.denoise_pred_boxes is None:
        raise ValueError("denoising terms need the outputs of a forward with the denoising queries")
    text_mask = prompt_mask(input_ids, attention_mask, outputs.denoise_logits.shape[-1])
    terms = denoising_losses(outputs.denoise_logits, outputs.denoise_pred_boxes, denoising, text_mask, config)
    weights = loss_weights(config)
    total = sum(v * weights[k.split("_dn")[0]] for k, v in terms.items())
    assert isinstance(total, Tensor)
    return total, terms
