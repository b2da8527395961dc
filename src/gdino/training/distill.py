"""Distillation: the frozen base model teaches what it knew while the model learns the user's classes.

    distiller = Distiller(teacher, names=dataset.names, kept_only=frozenset(old), weight=1.0)
    outputs = distilled_outputs(model, distiller, inputs, labels, captions)

The training captions name the base model's classes (``keep_classes``) beside the user's, but no
one annotated those: the data set's boxes are the user's classes only. So their tokens leave the
classification loss (``ignored_tokens``: a caption's "blue square" is neither a positive nor a
negative of the grounding loss), and the base model supervises them instead, on the same inputs:

* the teacher runs the batch and selects its queries; the student decodes **the same image tokens**
  (``query_index``: the selection is by position in the flattened feature maps, so query k of both
  models looks at the same place) besides its own selection, which the grounding loss trains;
* ``loss_distill_ce``: binary cross-entropy of the student's logits on the kept classes' tokens against
  the teacher's probabilities, summed over tokens, averaged over queries; where a teacher query's box
  overlaps one of the user's boxes (IoU >= 0.5), the target is 0: the user named that object, and
  the base model's guess ("red circle" on a new "pink circle") is not kept;
* ``loss_distill_bbox`` / ``loss_distill_giou``: L1 and 1 - GIoU of the student's boxes against the
  teacher's, on the teacher queries that find a kept class (best probability >= ``box_floor``) away
  from the user's boxes.

The three are weighted by the config's box and GIoU coefficients like the grounding loss, and all of
them by ``weight`` (``--distill``). The cost is a teacher forward (no gradient) and a second pass of
the encoder and decoder over the student's features (the backbone and BERT run once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.inference.postprocess import box_iou
from gdino.loss.criterion import paired_box_losses
from gdino.models.grounding_dino.model import GroundingDinoOutput
from gdino.training.captions import Caption
from gdino.utils.boxes import cxcywh_to_xyxy

OVERLAP_IOU = 0.5  # a teacher box this close to a user's box is the user's object


@dataclass
class Distiller:
    """The frozen base model and which phrases it alone supervises.

    Attributes:
        teacher: the model before fine-tuning, in eval mode, no gradients.
        names: the data set's label list (captions' ``label_ids`` index it).
        kept_only: the names nobody annotated: the kept classes the user's data set lacks.
        weight: the distillation loss's weight.
        ignore: leave the kept classes' tokens out of the grounding loss (True unless replay gave them boxes).
        box_floor: a teacher query gets the box terms when its best kept-class probability is this or more.
    """

    teacher: GroundingDinoForObjectDetection
    names: tuple[str, ...]
    kept_only: frozenset[str]
    weight: float
    ignore: bool = True
    box_floor: float = 0.3

    def kept_tokens(self, caption: Caption, width: int) -> np.ndarray:
        """(width,) bool: the tokens of the caption's phrases that are kept classes only."""
        out = np.zeros(width, dtype=bool)
        for tokens, label in zip(caption.tokens, caption.label_ids):
            if self.names[label] in self.kept_only:
                out[list(tokens)] = True
        return out


def distilled_outputs(
    model: GroundingDinoForObjectDetection,
    distiller: Distiller,
    inputs: Mapping[str, Tensor],
    labels: list[dict[str, Tensor]],
    captions: Sequence[Caption],
    denoising: object | None = None,
) -> GroundingDinoOutput:
    """The student's outputs with ``loss`` = grounding loss (kept-class tokens ignored) + distillation.

    Args:
        model: the student, in training mode.
        distiller: the teacher and the kept classes.
        inputs: the collated batch (``input_ids``, ``attention_mask``, ``token_type_ids``,
            ``pixel_values``, ``pixel_mask``).
        labels: the batch's targets; each gets its ``ignored_tokens`` (with ``distiller.ignore``).
        captions: each image's caption, to find the kept classes' tokens.
        denoising: ``DenoiseSettings`` for DINO's denoising queries, or None.
    """
    from gdino.loss.denoise import DenoiseSettings, make_denoising

    width = model.config.max_text_len
    rows = [torch.from_numpy(distiller.kept_tokens(caption, width)) for caption in captions]
    kept = torch.stack(rows).to(model.device)  # (B, W)
    if distiller.ignore:
        for label, row in zip(labels, kept):
            label["ignored_tokens"] = row
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        taught = distiller.teacher(**inputs)
    dn = make_denoising(ids, labels, model.config, denoising) if isinstance(denoising, DenoiseSettings) else None
    text = model.text_features(ids, mask, inputs["token_type_ids"])
    image = model.image_features(inputs["pixel_values"], inputs["pixel_mask"])
    decoded = model.decode(image, text, None, dn.queries if dn is not None else None)
    outputs = model.with_loss(model.training_outputs(decoded, text, ids), ids, mask, labels, dn)
    logits, boxes, _ = model.detect_features(image, text, taught.query_index)  # the teacher's queries
    terms = distillation_terms(logits, boxes, taught.logits, taught.pred_boxes, kept, labels, distiller.box_floor)
    config = model.config
    extra = (
        terms["loss_distill_ce"]
        + config.bbox_loss_coefficient * terms["loss_distill_bbox"]
        + config.giou_loss_coefficient * terms["loss_distill_giou"]
    )
    assert outputs.loss is not None and outputs.loss_dict is not None
    outputs.loss = outputs.loss + distiller.weight * extra
    outputs.loss_dict.update(terms)
    return outputs


def distillation_terms(
    logits: Tensor,
    boxes: Tensor,
    teacher_logits: Tensor,
    teacher_boxes: Tensor,
    kept: Tensor,
    labels: Sequence[Mapping[str, Tensor]],
    box_floor: float = 0.3,
) -> dict[str, Tensor]:
    """The three distillation terms.

    Args:
        logits, boxes: the student's (B, Q, W) logits and (B, Q, 4) cx cy w h boxes on the teacher's queries.
        teacher_logits, teacher_boxes: the teacher's, same shapes.
        kept: (B, W) True on the kept classes' tokens.
        labels: the user's boxes, ``labels[b]["boxes"]`` (N, 4) cx cy w h.
        box_floor: the least best kept-class probability of a teacher query that gets the box terms.
    """
    finite = torch.isfinite(teacher_logits) & torch.isfinite(logits)  # (B, Q, W): padding is -inf
    on = kept[:, None, :] & finite
    wanted = torch.where(finite, teacher_logits, torch.zeros_like(teacher_logits)).sigmoid()
    users = _near_user_boxes(teacher_boxes, labels)  # (B, Q)
    wanted = wanted.masked_fill(users[..., None], 0.0)
    queries = max(1, int(on.any(-1).sum()))
    bce = F.binary_cross_entropy_with_logits(
        torch.where(on, logits, torch.zeros_like(logits)), wanted, reduction="none"
    )  # (B, Q, W)
    ce = (bce * on).sum() / queries
    best = (wanted * on).amax(-1)  # (B, Q)
    found = (best >= box_floor) & ~users
    count = max(1.0, float(found.sum()))
    l1, giou = paired_box_losses(boxes[found], teacher_boxes[found].detach(), count)
    return {"loss_distill_ce": ce, "loss_distill_bbox": l1, "loss_distill_giou": giou}


def _near_user_boxes(teacher_boxes: Tensor, labels: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """(B, Q) True where a teacher box overlaps one of the image's user boxes by ``OVERLAP_IOU``."""
    out = torch.zeros(teacher_boxes.shape[:2], dtype=torch.bool)
    for b, label in enumerate(labels):
        truth = torch.as_tensor(label["boxes"], dtype=torch.float32).reshape(-1, 4)
        if len(truth):
            found = cxcywh_to_xyxy(teacher_boxes[b].detach().float().cpu()).numpy()
            overlap = box_iou(found, cxcywh_to_xyxy(truth.cpu()).numpy()).max(axis=1)  # (Q,)
            out[b] = torch.from_numpy(overlap >= OVERLAP_IOU)
    return out.to(teacher_boxes.device)
