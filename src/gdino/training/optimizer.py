"""The optimiser and its schedule: AdamW with one parameter group (and learning rate) per part
of the model (the image backbone, the text encoder, the rest), freezing parts, and the
learning-rate factor of each step (a linear warm-up, then a step decay or a cosine)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gdino.training.settings import TrainError, TrainSettings


def part_of(name: str) -> str:
    """``"backbone"``, ``"text"`` (BERT) or ``"head"`` (everything else) for a parameter name."""
    if name.startswith("backbone."):
        return "backbone"
    if name.startswith("bert."):
        return "text"
    return "head"


def freeze(model: nn.Module, parts: Sequence[str]) -> int:
    """Turns off gradients of the named parts; returns how many parameters were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if part_of(name) in parts:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def make_optimizer(model: nn.Module, settings: TrainSettings, from_scratch: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per part with its learning rate.

    Unset backbone and text rates are ``lr / 10`` when fine-tuning, ``lr`` when ``from_scratch``."""
    default = settings.lr if from_scratch else settings.lr / 10
    rates = {
        "head": settings.lr,
        "backbone": settings.lr_backbone if settings.lr_backbone is not None else default,
        "text": settings.lr_text if settings.lr_text is not None else default,
    }
    groups: dict[str, list[nn.Parameter]] = {"head": [], "backbone": [], "text": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[part_of(name)].append(param)
    params = [{"params": p, "lr": rates[k], "name": k} for k, p in groups.items() if p]
    if not params:
        raise TrainError("every parameter is frozen: nothing to train")
    # The fused kernel (one pass over each parameter) on CPU and CUDA: on CPU the default is a
    # Python loop of ~10 ops per parameter tensor, ~7% of a shapes-model step.
    trained = [p for group in groups.values() for p in group]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trained)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)


def lr_factor(step: int, total: int, settings: TrainSettings) -> float:
    """The learning-rate multiplier at ``step`` of ``total``: warm-up, then step or cosine."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "cosine":
        done = (step - settings.warmup_steps) / max(1, total - settings.warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return 0.1 if step >= int(settings.lr_drop * total) else 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer, total: int, settings: TrainSettings
) -> torch.optim.lr_scheduler.LambdaLR:
    """Steps once per optimiser step; ``total`` steps in all."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, settings))
