"""Training a SAM 2 segmenter from scratch on generated shapes: box prompts in, masks out.

As SAM trains its mask decoder: each object's ground-truth box, jittered, is the prompt; the
single-mask output is compared with the object's visible pixels by binary cross-entropy and dice
losses (weights 1 and 1; SAM's focal-heavy 20:1 focal and dice, ``focal_weight``, left every mask
empty here when training from scratch, after 500 steps), the IoU head is fitted by mean squared
error to the predicted mask's actual IoU, and the object-score head is told every prompt holds an
object. The mask logits are upsampled
bilinearly (2x by default) for the loss, so the low-resolution logits learn where the edge lies
between their cells. AdamW, linear warm-up, cosine decay; the run ends after ``steps``
or ``max_minutes``, whichever comes first (the schedule follows the one nearer its end).

``train_segmenter`` is the API; ``save_segmenter`` writes the Hugging Face layout ``load_sam2``
reads (``config.json``, ``model.safetensors``) plus ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gdino.checkpoint.convert_sam2 import ours_to_hf
from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.model import Sam2
from gdino.processing.image import IMAGENET_MEAN, IMAGENET_STD
from gdino.training.segmenter_data import PromptBatch, make_batch, split_scenes
from gdino.training.shapes import Scene, ShapesSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterTrainSettings:
    """How the segmenter is trained.

    Attributes:
        steps: optimiser steps (each ``batch_size`` fresh training images, all their objects prompted).
        batch_size: images a step.
        lr: peak learning rate.
        weight_decay: AdamW's.
        warmup: linear warm-up steps.
        min_lr_ratio: the cosine decay's floor, a fraction of ``lr``.
        box_noise: box-prompt noise, a fraction of the box's side (SAM: 0.1).
        max_box_noise: at most this many pixels of noise a coordinate (SAM: 20).
        bce_weight, focal_weight, dice_weight, iou_weight, object_weight: the loss terms' weights
            (SAM 2's are 0, 20, 1, 1, 1; from scratch, 1, 0, 1, 1, 1 learns).
        clip: gradient norm clipping (0: none).
        seed: the weights' initialisation, the box noise and the training images.
        max_minutes: stop after this long (None: run every step).
        log_every: steps between log lines.
        target_scale: the loss is computed at this many times the mask logits' side (logits
            upsampled bilinearly, targets the objects' coverage of each pixel).
        other_weight: the cross-entropy of pixels of the image's other objects counts 1 + this.
    """

    steps: int = 2000
    batch_size: int = 4
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 100
    min_lr_ratio: float = 0.02
    box_noise: float = 0.1
    max_box_noise: float = 20.0
    bce_weight: float = 1.0
    focal_weight: float = 0.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    object_weight: float = 1.0
    clip: float = 1.0
    seed: int = 0
    max_minutes: float | None = None
    log_every: int = 50
    target_scale: int = 2
    other_weight: float = 0.0
    shapes: ShapesSettings = field(default_factory=ShapesSettings)


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(N, H, W) logits and [0, 1] targets -> (N,) sigmoid focal loss, the mean over pixels."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (a_t * ce * (1 - p_t) ** gamma).flatten(1).mean(1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, H, W) logits and [0, 1] targets -> (N,) 1 - soft dice."""
    prob = logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)


def mask_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """(N, H, W) logits (> 0: inside) and [0, 1] targets (> 0.5: inside) -> (N,) IoU (1 when both are empty)."""
    pred, truth = logits > 0, targets > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    union = (pred | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0)


def losses(model: Sam2, batch: PromptBatch, settings: SegmenterTrainSettings) -> dict[str, Tensor]:
    """Each loss term (weighted mean over real prompts) and ``total``."""
    out = model(batch.pixels, boxes=batch.boxes, multimask_output=False)
    size = batch.targets.shape[-1]
    logits = F.interpolate(out.pred_masks.flatten(0, 2)[:, None], size=(size, size), mode="bilinear")[:, 0]
    targets = batch.targets.flatten(0, 1)  # (B * P, S, S)
    weights = batch.weights.flatten()  # (B * P,)
    iou = mask_iou(logits.detach(), targets)
    pixel_weights = 1 + settings.other_weight * batch.others.flatten(0, 1)  # (B * P, T, T)
    terms = {
        "bce": (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * pixel_weights)
        .flatten(1)
        .mean(1),
        "focal": focal_loss(logits, targets),
        "dice": dice_loss(logits, targets),
        "iou": (out.iou_scores.flatten() - iou) ** 2,
        "object": F.binary_cross_entropy_with_logits(
            out.object_score_logits.flatten(), torch.ones_like(weights), reduction="none"
        ),
    }
    result = {name: (term * weights).sum() / weights.sum() for name, term in terms.items()}
    result["total"] = (
        settings.bce_weight * result["bce"]
        + settings.focal_weight * result["focal"]
        + settings.dice_weight * result["dice"]
        + settings.iou_weight * result["iou"]
        + settings.object_weight * result["object"]
    )
    result["mask_iou"] = (iou * weights).sum() / weights.sum()
    return result


def learning_rate(progress: float, step: int, settings: SegmenterTrainSettings) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at progress 1."""
    warm = min(1.0, (step + 1) / max(settings.warmup, 1))
    floor = settings.min_lr_ratio
    return settings.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_segmenter(
    settings: SegmenterTrainSettings,
    config: Sam2Config | None = None,
    photos: Sequence[np.ndarray] = (),
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> Sam2:
    """Trains a ``Sam2`` from random weights on freshly rendered ``train``-split shapes.

    Args:
        settings: the schedule, the losses and the images.
        config: the architecture (default ``Sam2Config.shapes()``).
        photos: background photos for the generator.
        on_log: called every ``log_every`` steps with the running means (and step, lr, seconds).

    Returns:
        The trained model, in eval mode.
    """
    torch.manual_seed(settings.seed)
    model = Sam2(config or Sam2Config.shapes()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    rng = np.random.default_rng([settings.seed, 1])
    size = model.config.image_size
    target = settings.target_scale * 4 * model.config.embedding_size  # the loss's side
    budget = settings.max_minutes * 60 if settings.max_minutes else math.inf
    start, image = time.monotonic(), 0
    running: dict[str, float] = {}
    for step in range(settings.steps):
        progress = max(step / settings.steps, (time.monotonic() - start) / budget)
        if progress >= 1:
            logger.info("segmenter: stopped by time after %d steps", step)
            break
        scenes: list[Scene] = []
        while len(scenes) < settings.batch_size:
            scenes += split_scenes("train", image, 1, settings.seed, settings.shapes, photos)
            image += 1
        batch = make_batch(scenes, size, rng, settings.box_noise, settings.max_box_noise, target)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, step, settings)
        terms = losses(model, batch, settings)
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if settings.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        for name, value in terms.items():
            running[name] = running.get(name, 0.0) + float(value.detach())
        if (step + 1) % settings.log_every == 0:
            line = {k: v / settings.log_every for k, v in running.items()}
            line |= {"step": step + 1, "lr": optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - start}
            logger.info("segmenter: %s", " ".join(f"{k} {v:.4g}" for k, v in line.items()))
            if on_log is not None:
                on_log(line)
            running = {}
    return model.eval()


def save_segmenter(model: Sam2, directory: str | Path, extra: dict[str, object] | None = None) -> Path:
    """Writes ``config.json``, ``model.safetensors`` (transformers' ``Sam2Model`` names),
    ``preprocessor_config.json`` (SAM 2's processor settings for the model's input size) and, given
    ``extra``, ``training.json`` (how it was trained) to ``directory``."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ours_to_hf(model.state_dict()).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict() | {"image_size": config.image_size}
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if extra:
        (out / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    low_res = 4 * config.embedding_size
    processor = {
        "image_processor_type": "Sam2ImageProcessorFast",
        "processor_class": "Sam2Processor",
        "do_resize": True,
        "size": {"height": config.image_size, "width": config.image_size},
        "mask_size": {"height": low_res, "width": low_res},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def settings_record(settings: SegmenterTrainSettings) -> dict[str, object]:
    """The settings as JSON-ready values (for ``save_segmenter``'s ``extra``)."""
    return json.loads(json.dumps(asdict(settings)))
