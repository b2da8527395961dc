"""The detection loss of Grounding DINO, term by term as transformers computes it.

For one set of predictions (the last decoder layer, each earlier layer when the config asks for
auxiliary losses, and the encoder's proposals) the queries are matched to the targets
(``matcher.hungarian_match``), then

* ``loss_ce``: sigmoid focal loss over every query and every text token; a matched query's
  targets are the tokens of its target's phrase (the positive map), all else is 0;
* ``loss_bbox``: L1 distance of the matched (cx, cy, w, h) boxes;
* ``loss_giou``: 1 - generalized IoU of the matched boxes;
* ``cardinality_error``: |predicted boxes - target boxes| per image, for logging (no gradient);

each summed and divided by the number of target boxes in the batch. ``loss`` is the weighted sum
(``class_loss_coefficient``, ``bbox_loss_coefficient``, ``giou_loss_coefficient``) of every set's
terms. Keys follow transformers: ``loss_ce``, ``loss_ce_0`` .. ``loss_ce_{L-2}``, ``loss_ce_enc``.

A target's class indexes the prompt's phrases: the runs of tokens between [CLS], [SEP], ".",
"?" and padding, as transformers' ``build_label_maps`` splits them ("a cat. a remote control."
has phrase 0 "a cat" and phrase 1 "a remote control"). transformers offsets the second image's
classes by its own phrase count instead of the first image's (right only when every prompt of
the batch has as many phrases); here each image's classes index its own prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gdino.loss.matcher import MatchCosts, hungarian_match
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDinoOutput
from gdino.utils.boxes import cxcywh_to_xyxy, generalized_box_iou

Matches = list[tuple[Tensor, Tensor]]  # per image (query indices, target indices)


@dataclass(frozen=True)
class Targets:
    """The batch's targets, checked and laid out for matching.

    Attributes:
        token_maps: per image, (N_i, W) float, 1 on the tokens of each target's phrase.
        boxes: per image, (N_i, 4) (cx, cy, w, h) normalised to the image.
        num_boxes: the number of target boxes in the batch, at least 1 (the terms' divisor).
        phrases: per image, (P_i, W) float, 1 on each of the prompt's phrases' tokens (the rows
            ``token_maps`` were taken from; denoising draws its flipped labels from them).
    """

    token_maps: list[Tensor]
    boxes: list[Tensor]
    num_boxes: float
    phrases: list[Tensor]


def phrase_token_maps(input_ids: Tensor, special_token_ids: Sequence[int], width: int) -> list[Tensor]:
    """Per image, (P_i, width) float: row k is 1 on the tokens of the prompt's k-th phrase.

    Phrases are the runs of tokens between special tokens and padding (id 0), in order.
    """
    delimiters = torch.tensor([*special_token_ids, 0], device=input_ids.device)
    is_delimiter = torch.isin(input_ids, delimiters)  # (B, T)
    groups = torch.cumsum(is_delimiter, 1) * ~is_delimiter  # (B, T): run number, 0 on delimiters
    maps = []
    for row in groups:
        ids = torch.unique(row)
        ids = ids[ids > 0]
        phrase_map = (row[None, :] == ids[:, None]).float()  # (P, T)
        maps.append(F.pad(phrase_map, (0, width - row.shape[0])))
    return maps


def make_targets(labels: Sequence[Mapping[str, Tensor]], phrase_maps: list[Tensor], device: torch.device) -> Targets:
    """Checks transformers-style ``labels`` against the prompts' phrases and lays them out.

    Args:
        labels: per image ``{"class_labels": (N,) int, "boxes": (N, 4) (cx, cy, w, h) in [0, 1]}``,
            optionally with ``"positive_map"`` (P, W), 1 on phrase p's tokens, for captions whose
            phrases are not the runs between "." (grounding captions); ``class_labels`` then
            index its rows instead of the prompt's phrases.
        phrase_maps: per image, (P_i, W) from ``phrase_token_maps``.
    """
    if len(labels) != len(phrase_maps):
        raise ValueError(f"labels has {len(labels)} entries for a batch of {len(phrase_maps)} images")
    token_maps, boxes, tables = [], [], []
    for i, (label, phrases) in enumerate(zip(labels, phrase_maps)):
        if "class_labels" not in label or "boxes" not in label:
            raise ValueError(f"labels[{i}] needs 'class_labels' and 'boxes', it has {sorted(label)}")
        if "positive_map" in label:
            phrases = torch.as_tensor(label["positive_map"], device=device, dtype=torch.float32)
            if phrases.ndim != 2 or phrases.shape[1] != phrase_maps[i].shape[1] or bool((phrases.sum(1) <= 0).any()):
                raise ValueError(
                    f"labels[{i}]: positive_map must be (phrases, {phrase_maps[i].shape[1]}) with tokens in every row, "
                    f"not {tuple(phrases.shape)}"
                )
        classes = torch.as_tensor(label["class_labels"], device=device).long().reshape(-1)
        box = torch.as_tensor(label["boxes"], device=device, dtype=torch.float32)
        if box.shape != (len(classes), 4):
            raise ValueError(
                f"labels[{i}]: boxes must be ({len(classes)}, 4) for {len(classes)} classes, not {tuple(box.shape)}"
            )
        if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= len(phrases)):
            raise ValueError(
                f"labels[{i}]: class_labels {classes.tolist()} must index the prompt's {len(phrases)} phrases"
            )
        if not bool(torch.isfinite(box).all()) or bool((box[:, 2:] < 0).any()):
            raise ValueError(f"labels[{i}]: boxes must be finite (cx, cy, w, h) with w, h >= 0")
        token_maps.append(phrases[classes])
        boxes.append(box)
        tables.append(phrases)
    return Targets(token_maps, boxes, max(float(sum(len(b) for b in boxes)), 1.0), tables)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float, gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss of ``logits`` against 0/1 ``targets`` (same shape), summed, / ``num_boxes``."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum() / num_boxes


def classification_loss(logits: Tensor, matches: Matches, targets: Targets, text_mask: Tensor, alpha: float) -> Tensor:
    """``loss_ce``: focal loss over the text tokens of every query (the positive maps as targets).

    Args:
        logits: (B, Q, W) query-token logits; text_mask: (B, W) True on the prompt's tokens.
    """
    positive = torch.zeros_like(logits)
    for b, (queries, which) in enumerate(matches):
        positive[b, queries.to(logits.device)] = targets.token_maps[b][which.to(logits.device)].to(logits.dtype)
    keep = text_mask[:, None, :].expand_as(logits)  # (B, Q, W)
    return sigmoid_focal_loss(logits[keep], positive[keep], targets.num_boxes, alpha)


def box_losses(boxes: Tensor, matches: Matches, targets: Targets) -> tuple[Tensor, Tensor]:
    """``loss_bbox`` (L1) and ``loss_giou`` (1 - GIoU) of the matched boxes. ``boxes`` (B, Q, 4) (cx, cy, w, h)."""
    predicted = torch.cat([boxes[b, q.to(boxes.device)] for b, (q, _) in enumerate(matches)])  # (M, 4)
    wanted = torch.cat([targets.boxes[b][t.to(boxes.device)] for b, (_, t) in enumerate(matches)])
    return paired_box_losses(predicted, wanted, targets.num_boxes)


def paired_box_losses(predicted: Tensor, wanted: Tensor, divisor: float) -> tuple[Tensor, Tensor]:
    """L1 and 1 - GIoU of (M, 4) (cx, cy, w, h) boxes against their (M, 4) targets, each summed / ``divisor``."""
    wanted = wanted.to(predicted.dtype)
    l1 = F.l1_loss(predicted, wanted, reduction="none").sum() / divisor
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(wanted)))
    return l1, (1 - giou).sum() / divisor


@torch.no_grad()
def cardinality_error(logits: Tensor, targets: Targets) -> Tensor:
    """Mean over images of |queries whose best token scores above 0.5 - target boxes| (for logging)."""
    predicted = (logits.sigmoid().max(-1).values > 0.5).sum(1).float()  # (B,)
    wanted = torch.tensor([float(len(b)) for b in targets.boxes], device=logits.device)
    return F.l1_loss(predicted, wanted)


def set_losses(
    logits: Tensor, boxes: Tensor, targets: Targets, text_mask: Tensor, config: GroundingDinoConfig
) -> tuple[dict[str, Tensor], Matches]:
    """Matches one set of predictions (B, Q, W) logits and (B, Q, 4) boxes; returns its terms and the matches."""
    costs = MatchCosts(config.class_cost, config.bbox_cost, config.giou_cost)
    matches = hungarian_match(logits.detach(), boxes.detach(), _normalised(targets.token_maps), targets.boxes, costs)
    loss_bbox, loss_giou = box_losses(boxes, matches, targets)
    terms = {
        "loss_ce": classification_loss(logits, matches, targets, text_mask, config.focal_alpha),
        "loss_bbox": loss_bbox,
        "loss_giou": loss_giou,
        "cardinality_error": cardinality_error(logits, targets),
    }
    return terms, matches


def loss_weights(config: GroundingDinoConfig) -> dict[str, float]:
    """The weight of every term that enters ``loss`` (``cardinality_error`` does not)."""
    base = {
        "loss_ce": config.class_loss_coefficient,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
    }
    suffixes = ["", "_enc"] + ([f"_{i}" for i in range(config.decoder_layers - 1)] if config.auxiliary_loss else [])
    return {k + s: w for s in suffixes for k, w in base.items()}


def grounding_loss(
    outputs: GroundingDinoOutput,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    labels: Sequence[Mapping[str, Tensor]],
    config: GroundingDinoConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and every named term, from the model's outputs with ``intermediate=True``.

    Args:
        outputs: needs ``decoder_logits`` (L, B, Q, W), ``decoder_pred_boxes`` (L, B, Q, 4),
            ``encoder_logits`` (B, Q, W) and ``encoder_pred_boxes`` (B, Q, 4).
        input_ids: (B, T) the prompts; attention_mask: (B, T) 1 on real tokens, or None.
        labels: per image ``{"class_labels": (N,) phrase indices, "boxes": (N, 4) cx cy w h}``,
            optionally ``"ignored_tokens"``: (W,) bool, tokens the classification loss leaves out
            (phrases nobody annotated, which distillation supervises instead: ``gdino.training.distill``).

    Returns:
        ``loss`` (a scalar) and ``loss_dict`` with transformers' keys.
    """
    if outputs.decoder_logits is None or outputs.decoder_pred_boxes is None:
        raise ValueError("the loss needs the model's outputs with intermediate=True")
    if outputs.encoder_logits is None or outputs.encoder_pred_boxes is None:
        raise ValueError("the loss needs the model's outputs with intermediate=True")
    width = outputs.logits.shape[-1]
    targets = make_targets(labels, phrase_token_maps(input_ids, config.special_token_ids, width), outputs.logits.device)
    text_mask = prompt_mask(input_ids, attention_mask, width) & ~ignored_tokens(labels, width, input_ids.device)
    loss_dict, _ = set_losses(outputs.decoder_logits[-1], outputs.decoder_pred_boxes[-1], targets, text_mask, config)
    if config.auxiliary_loss:
        for i in range(outputs.decoder_logits.shape[0] - 1):
            terms, _ = set_losses(outputs.decoder_logits[i], outputs.decoder_pred_boxes[i], targets, text_mask, config)
            loss_dict.update({f"{k}_{i}": v for k, v in terms.items()})
    terms, _ = set_losses(outputs.encoder_logits, outputs.encoder_pred_boxes, targets, text_mask, config)
    loss_dict.update({f"{k}_enc": v for k, v in terms.items()})
    weights = loss_weights(config)
    loss = sum(v * weights[k] for k, v in loss_dict.items() if k in weights)  # transformers' order
    assert isinstance(loss, Tensor)
    return loss, loss_dict


def ignored_tokens(labels: Sequence[Mapping[str, Tensor]], width: int, device: torch.device) -> Tensor:
    """(B, width) True on each image's ``"ignored_tokens"`` (False where it has none)."""
    out = torch.zeros(len(labels), width, dtype=torch.bool, device=device)
    for i, label in enumerate(labels):
        if "ignored_tokens" in label:
            row = torch.as_tensor(label["ignored_tokens"], device=device).bool().reshape(-1)
            if row.shape[0] != width:
                raise ValueError(f"labels[{i}]: ignored_tokens must have {width} entries, not {row.shape[0]}")
            out[i] = row
    return out


def prompt_mask(input_ids: Tensor, attention_mask: Tensor | None, width: int) -> Tensor:
    """(B, width) True on the prompt's tokens (``attention_mask``'s ones; all of ``input_ids`` when None)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return F.pad(attention_mask.bool(), (0, width - attention_mask.shape[1]))


def _normalised(token_maps: list[Tensor]) -> list[Tensor]:
    """Each target's phrase map divided by the phrase's token count (the matcher's class cost averages)."""
    return [m / m.sum(-1, keepdim=True) for m in token_maps]
