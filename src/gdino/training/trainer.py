"""The training loop: optimiser, schedule, precision, checkpoints, validation and resuming.

    from gdino.training.trainer import TrainSettings, train
    result = train("train.json", "config:shapes", "runs/shapes", TrainSettings(epochs=8, image_size=256))

The recipe is Open-GroundingDino's fine-tuning one: AdamW (weight decay 1e-4), a lower learning
rate for the image backbone and the text encoder (``lr_backbone`` 1e-5 against 1e-4), gradient
clipping at 0.1 (DINO's ``clip_max_norm``), a step decay (x0.1) late in training, or a cosine
schedule, after an optional linear warm-up.

Each epoch writes ``OUT/epoch-N/`` in the Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer and preprocessor files), which both ``gdino`` and transformers'
``GroundingDinoForObjectDetection.from_pretrained`` load, plus ``trainer_state.pt`` (optimiser,
schedule, RNG, data position) that ``resume`` continues from; ``save_every`` steps also writes
``OUT/last/``. The data order of an epoch depends only on ``(seed, epoch)`` (see ``loader``), so a
resumed run on CPU ends with exactly the weights of an uninterrupted one; the resume state also
carries the epoch's running loss sums and the history so far, so ``OUT/history.jsonl`` of a
resumed run is the uninterrupted run's too (but for ``seconds``).

An OUT holds one run. ``OUT/train_settings.json`` records what the run trains (model, data, and
the settings in ``TRAINED``); a new run into an OUT that holds one is refused unless ``resume``
(continue it, refused where a recorded setting differs, each one named) or ``overwrite`` (start
over, the old run's files removed first). Nothing the trainer writes replaces a file that no
gdino training run wrote: other files in OUT are left alone, and one in the way is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.processing.processor import GroundingDinoProcessor
from gdino.training.augment import Augment, AugmentSettings
from gdino.training.captions import CaptionBuilder
from gdino.training.loader import Example, collate, epoch_order, examples
from gdino.training.samples import Dataset, Problem

logger = logging.getLogger(__name__)

PRESETS: dict[str, Callable[[], GroundingDinoConfig]] = {
    "shapes": GroundingDinoConfig.shapes,
    "tiny": GroundingDinoConfig.tiny,
    "small_test": GroundingDinoConfig.small_test,
}
FREEZABLE = ("backbone", "text")
STATE_FILE = "trainer_state.pt"
RUN_FILE = "train_settings.json"  # what the run in OUT trains (``run_record``)
HISTORY_FILE = "history.jsonl"
# The settings that change what is trained: a resume is refused where one differs from the run's.
# The others (device, save_every, max_minutes, export_original, val_limit) may change between sessions.
TRAINED = (
    "epochs",
    "batch_size",
    "lr",
    "lr_backbone",
    "lr_text",
    "weight_decay",
    "schedule",
    "lr_drop",
    "warmup_steps",
    "clip_max_norm",
    "freeze",
    "dtype",
    "seed",
    "image_size",
    "augment",
    "max_labels",
    "max_steps",
    "denoise",
    "aux_loss",
)
# ``gdino train``'s flag of each setting, for messages; the rest are ``--`` and the name with hyphens.
FLAGS = {"warmup_steps": "--warmup", "clip_max_norm": "--clip", "augment": "--no-augment"}


class TrainError(ValueError):
    """Training cannot start: a bad setting, an unknown preset, or an OUT that ``claim`` refuses."""


@dataclass(frozen=True)
class TrainSettings:
    """How to train.

    Attributes:
        epochs: passes over the data.
        batch_size: images a step.
        lr: learning rate of everything but the backbone and the text encoder.
        lr_backbone: the Swin backbone's learning rate (``None``: ``lr / 10``).
        lr_text: BERT's learning rate (``None``: ``lr / 10``).
        weight_decay: AdamW's.
        schedule: ``"step"`` (x0.1 at ``lr_drop`` of the steps) or ``"cosine"`` (to 1% of lr).
        lr_drop: where the step schedule drops, a fraction of all steps.
        warmup_steps: linear warm-up from 0.
        clip_max_norm: gradient clipping (0: none).
        freeze: parts whose weights stay as they are: ``"backbone"``, ``"text"``.
        dtype: ``None`` (float32), ``"bf16"`` or ``"fp16"``: autocast for the forward pass.
        device: where to train.
        seed: fixes the initialisation, the data order and the augmentation.
        image_size: short side of training images (long side at most 1333/800 of it), and of the
            saved processor; ``None`` keeps the model's processor settings (800).
        augment: flip, multi-scale resize and crop; ``False`` only resizes to ``image_size``.
        max_labels: most labels in a detection caption.
        save_every: also write ``OUT/last/`` every this many steps (0: only at epoch ends).
        max_steps: stop (with a checkpoint) after this many steps in all; ``None``: run all epochs.
        max_minutes: stop (with a checkpoint and validation) once training has taken this long.
        export_original: also write ``groundingdino.pth`` in the original repository's layout.
        val_limit: validate on the first this many images only.
        denoise: DINO's contrastive denoising queries per step (0: none; DINO uses 100): noised
            copies of the targets that the decoder learns to refine or reject
            (``gdino.loss.denoise``); speeds up convergence, most of all from scratch.
        aux_loss: also a loss on every decoder layer but the last (the original recipe does);
            ``None`` keeps the model config's ``auxiliary_loss`` (the published config has it off,
            transformers' default). The saved checkpoints' configs record the choice.
    """

    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    lr_backbone: float | None = None
    lr_text: float | None = None
    weight_decay: float = 1e-4
    schedule: str = "step"
    lr_drop: float = 0.8
    warmup_steps: int = 0
    clip_max_norm: float = 0.1
    freeze: tuple[str, ...] = ()
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    image_size: int | None = None
    augment: bool = True
    max_labels: int = 80
    save_every: int = 0
    max_steps: int | None = None
    max_minutes: float | None = None
    export_original: bool = False
    val_limit: int | None = None
    denoise: int = 0
    aux_loss: bool | None = None

    def check(self) -> None:
        """Raises ``TrainError`` for a setting that cannot work."""
        unknown = set(self.freeze) - set(FREEZABLE)
        if unknown:
            raise TrainError(f"cannot freeze {sorted(unknown)}; choose from {', '.join(FREEZABLE)}")
        if self.schedule not in ("step", "cosine"):
            raise TrainError(f"schedule must be 'step' or 'cosine', not {self.schedule!r}")
        if self.dtype not in (None, "fp32", "bf16", "fp16"):
            raise TrainError(f"dtype must be bf16, fp16 or fp32, not {self.dtype!r}")
        if self.denoise < 0:
            raise TrainError(f"denoise must be 0 (off) or a number of queries, not {self.denoise}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainError("epochs and batch size must be at least 1 and lr positive")


@dataclass
class Position:
    """Where training is: ``epoch`` and how far into its order (``offset`` samples), ``step`` in all."""

    epoch: int = 0
    offset: int = 0
    step: int = 0


@dataclass
class TrainResult:
    """What ``train`` did: the last checkpoint, each epoch's mean losses and validation metrics.

    ``history`` holds this session's records; ``already_finished``: the run in OUT had finished
    before (a resume that did nothing), and ``history`` is the run's whole history."""

    checkpoint: Path | None
    position: Position
    history: list[dict[str, Any]] = field(default_factory=list)
    already_finished: bool = False


# --------------------------------------------------------------------------- model


def init_weights(model: nn.Module, seed: int = 0) -> None:
    """A trainable random start, as Deformable DETR / DINO initialise (the constructors' defaults
    elsewhere): deformable sampling offsets on a ring per head, zero attention weights, xavier
    value/output projections, and box heads whose last layer is zero (queries start at their
    reference boxes). The encoder output's norm, whose output meets the text in the proposals'
    class scores, starts at 0.1 scale: the logits are plain dot products, and at unit scale they
    start at several units, so the focal loss of ~20k negative token pairs starts in the thousands.
    The decoder's final norm keeps unit scale: the box head refines each layer's reference box
    from the layer's output *before* that norm (as the original and transformers do) but is
    trained on its output *after* it, so a 0.1 scale there makes every refinement step ~10x the
    step the loss trained, and later decoder layers end worse than earlier ones."""
    from gdino.models.grounding_dino.deformable import MultiScaleDeformableAttention
    from gdino.models.grounding_dino.heads import MLP

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            _init_deformable(module)
    norm = model.get_submodule("transformer.enc_output_norm")
    assert isinstance(norm, nn.LayerNorm)
    nn.init.constant_(norm.weight, 0.1)
    for name in ("bbox_embed", "transformer.enc_out_bbox_embed"):
        head = model.get_submodule(name)
        assert isinstance(head, MLP)
        last = head.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)


def _init_deformable(m: Any) -> None:
    """``m``: a ``MultiScaleDeformableAttention``."""
    heads, levels, points = int(m.n_heads), int(m.n_levels), int(m.n_points)
    nn.init.zeros_(m.sampling_offsets.weight)
    angles = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([angles.cos(), angles.sin()], -1)  # (heads, 2)
    grid = grid / grid.abs().max(-1, keepdim=True).values
    grid = grid.view(heads, 1, 1, 2).repeat(1, levels, points, 1)  # (heads, levels, points, 2)
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    with torch.no_grad():
        m.sampling_offsets.bias.copy_(grid.flatten())
    nn.init.zeros_(m.attention_weights.weight)
    nn.init.zeros_(m.attention_weights.bias)
    for proj in (m.value_proj, m.output_proj):
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)


def build_model(spec: str | Path, seed: int = 0) -> GroundingDinoForObjectDetection:
    """The model to train: ``config:NAME`` (a preset: shapes, tiny, small_test) with random
    weights, else whatever ``from_pretrained`` loads (hub id, directory, checkpoint file)."""
    text = str(spec)
    if text.startswith("config:"):
        name = text.removeprefix("config:")
        if name not in PRESETS:
            raise TrainError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return from_config(PRESETS[name](), seed)
    return GroundingDinoForObjectDetection.from_pretrained(text)


def from_config(config: GroundingDinoConfig, seed: int = 0) -> GroundingDinoForObjectDetection:
    """A randomly initialised model of ``config`` with the packaged processor."""
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config)
    init_weights(model, seed)
    model.processor = GroundingDinoProcessor.default(config.max_text_len)
    return model


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


def autocast(device: torch.device, dtype: str | None) -> AbstractContextManager[Any]:
    """Autocast for the forward pass: any half type on CUDA, bf16 on a CPU with native bf16.

    Raises:
        TrainError: fp16 on CPU, or bf16 on a CPU that would emulate it (slower than float32).
    """
    if dtype in (None, "fp32"):
        return nullcontext()
    half = torch.bfloat16 if dtype == "bf16" else torch.float16
    if device.type == "cpu":
        from gdino.checkpoint.loading import NATIVE_CPU_FLAGS

        if half == torch.float16 or not _cpu_has(NATIVE_CPU_FLAGS[torch.bfloat16]):
            raise TrainError(
                f"--dtype {dtype} on this CPU would be emulated (slower than fp32); "
                "train in fp32 on CPU, or bf16/fp16 on a GPU"
            )
    return torch.autocast(device.type, dtype=half)


def _cpu_has(flags: Sequence[str], cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in have for flag in flags)


# --------------------------------------------------------------------------- one step


def train_step(
    model: GroundingDinoForObjectDetection,
    batch: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: TrainSettings,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Forward with labels, backward, clip, step; returns the loss terms as floats."""
    device = model.device
    # Augmented images are already sized; without augmentation the processor resizes them to --image-size.
    inputs, labels = collate(batch, model.processor, resize=not settings.augment)
    inputs = inputs.to(device)
    labels = [{k: v.to(device) for k, v in t.items()} for t in labels]
    denoising = None
    if settings.denoise > 0:
        from gdino.loss.denoise import DenoiseSettings

        denoising = DenoiseSettings(queries=settings.denoise)
    with autocast(device, settings.dtype):
        outputs = model(**inputs, labels=labels, denoising=denoising)
    loss = outputs.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss is {float(loss)}; lower --lr or use fp32")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if settings.clip_max_norm > 0:
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(trainable, settings.clip_max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    terms = {k: float(v.detach()) for k, v in outputs.loss_dict.items()}
    return {"loss": float(loss.detach()), **terms}


# --------------------------------------------------------------------------- the loop


@dataclass
class Run:
    """Everything the loop carries: the model, its optimiser and schedule, data and settings."""

    model: GroundingDinoForObjectDetection
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dataset: Dataset
    captions: CaptionBuilder
    augment: Augment | None
    settings: TrainSettings
    out: Path
    position: Position
    scaler: torch.amp.GradScaler | None = None
    log: IO[str] = sys.stderr
    began: float = field(default_factory=time.monotonic)
    record: dict[str, Any] = field(default_factory=dict)  # ``run_record``: written with the first checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)  # history.jsonl's records but a stop by time's
    sums: dict[str, float] = field(default_factory=dict)  # the current epoch's loss terms, summed
    epoch_steps: int = 0  # the steps the sums are over
    seconds_before: float = 0.0  # training time of the sessions before this one

    def out_of_time(self) -> bool:
        s = self.settings
        return (s.max_steps is not None and self.position.step >= s.max_steps) or (
            s.max_minutes is not None and time.monotonic() - self.began >= 60 * s.max_minutes
        )

    def seconds(self) -> float:
        """Training time in all, over every session of the run."""
        return self.seconds_before + time.monotonic() - self.began


def finished(position: Position, settings: TrainSettings) -> bool:
    """Whether a run at ``position`` has done all its epochs, or its ``max_steps``."""
    return position.epoch >= settings.epochs or (settings.max_steps is not None and position.step >= settings.max_steps)


def set_image_size(processor: GroundingDinoProcessor, short: int | None) -> GroundingDinoProcessor:
    """The processor with its images resized to ``short`` (long side at most 1333/800 of it)."""
    if short is None:
        return processor
    settings = replace(processor.image_settings, shortest_edge=short, longest_edge=round(short * 1333 / 800))
    return GroundingDinoProcessor(processor.tokenizer, settings)


def make_augment(settings: TrainSettings) -> Augment | None:
    """The original recipe, scaled to ``image_size``; ``None`` without augmentation."""
    if not settings.augment:
        return None
    if settings.image_size is None:
        return Augment()
    return Augment(AugmentSettings.scaled(settings.image_size / 800))


def state_of(run: Run) -> dict[str, Any]:
    """What ``resume`` needs besides the weights: optimiser, schedule, RNG, position, and for the
    history to come out as an uninterrupted run's, the finished epochs' records and the current
    epoch's loss sums."""
    state = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "position": asdict(run.position),
        "settings": asdict(run.settings),
        "history": list(run.history),
        "epoch_sums": {"sums": dict(run.sums), "steps": run.epoch_steps},
        "seconds": run.seconds(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore(run: Run, state: dict[str, Any]) -> None:
    """Puts the optimiser, schedule, RNG, data position, history and loss sums back as a checkpoint
    saved them (a state of an earlier gdino has no history or sums: the epoch's mean is then over
    the steps after the resume)."""
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.position = Position(**state["position"])
    run.history = list(state.get("history", []))
    sums = state.get("epoch_sums", {})
    run.sums, run.epoch_steps = dict(sums.get("sums", {})), int(sums.get("steps", 0))
    run.seconds_before = float(state.get("seconds", 0.0))


def checkpoint(run: Run, name: str) -> Path:
    """Writes ``OUT/name/`` (model, processor, resume state) and, if asked, the original layout;
    the first one of a run also writes ``OUT/train_settings.json``."""
    from gdino.checkpoint.saving import ORIGINAL_FILE, export_original, save_pretrained
    from gdino.utils.files import write_atomic

    if run.record and not (run.out / RUN_FILE).is_file():
        write_atomic(run.out / RUN_FILE, json.dumps(run.record, indent=2) + "\n")
    directory = save_pretrained(run.model, run.out / name, run.model.processor, state_of(run))
    if run.settings.export_original:
        export_original(run.model, directory / ORIGINAL_FILE)
    return directory


def epoch_batches(run: Run) -> Iterator[list[Example]]:
    """The rest of the current epoch in batches; advances ``run.position.offset`` past each."""
    s, pos = run.settings, run.position
    order = epoch_order(len(run.dataset), s.seed, pos.epoch)
    where = np.empty_like(order)
    where[order] = np.arange(len(order))  # sample index -> its place in the order
    batch: list[Example] = []

    def report(problem: Problem) -> None:
        print(f"train: {problem}", file=run.log, flush=True)

    for ex in examples(run.dataset, run.captions, run.augment, s.seed, pos.epoch, pos.offset, on_problem=report):
        batch.append(ex)
        if len(batch) == s.batch_size:
            pos.offset = int(where[batch[-1].index]) + 1  # set before the step, so a checkpoint after it is right
            yield batch
            batch = []
    pos.offset = len(order)
    if batch:
        yield batch


def run_epoch(run: Run) -> tuple[dict[str, float], bool]:
    """Trains on the rest of the epoch; returns the mean loss terms over the whole epoch (the steps
    before a resume included) and whether ``max_steps`` or ``max_minutes`` stopped it."""
    from gdino.utils.progress import Progress

    s, pos = run.settings, run.position
    left = len(run.dataset) - pos.offset
    with Progress(left, f"epoch {pos.epoch + 1}/{s.epochs}", stream=run.log) as progress:
        for batch in epoch_batches(run):
            terms = train_step(run.model, batch, run.optimizer, run.scheduler, s, run.scaler)
            pos.step += 1
            run.epoch_steps += 1
            for k, v in terms.items():
                run.sums[k] = run.sums.get(k, 0.0) + v
            progress.postfix = f"loss {terms['loss']:.3f} lr {run.scheduler.get_last_lr()[0]:.2e}"
            progress.update(len(batch))
            if run.out_of_time():
                return _means(run.sums, run.epoch_steps), True
            if s.save_every and pos.step % s.save_every == 0:
                checkpoint(run, "last")
    return _means(run.sums, run.epoch_steps), False


def _means(totals: dict[str, float], steps: int) -> dict[str, float]:
    return {k: v / max(1, steps) for k, v in totals.items()}


def validate(
    model: GroundingDinoForObjectDetection, annotations: Path, limit: int | None = None, log: IO[str] | None = None
) -> dict[str, float]:
    """COCO metrics of ``model`` on a COCO file (images relative to its folder), as ``gdino eval coco``."""
    from gdino.evaluation.coco import evaluate_coco, model_detector

    was_training = model.training
    model.eval()
    try:
        result = evaluate_coco(
            annotations.parent, annotations, lambda names: model_detector(model, names), limit=limit, log=log
        )
    finally:
        model.train(was_training)
    return result.metrics


def load_data(data: str | Path | Dataset, log: IO[str]) -> Dataset:
    """Reads the training data and prints its bad-record report (the records skipped)."""
    from gdino.training.datasets import read_dataset

    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    print(f"train: {dataset.report()}", file=log, flush=True)
    if not len(dataset):
        raise TrainError(f"{dataset.source}: no usable training images")
    return dataset


# --------------------------------------------------------------------------- the run in OUT


def model_identity(model: str | Path | GroundingDinoForObjectDetection) -> str:
    """What a run's ``model`` is, to compare on resume: a local path resolved, a hub id or
    ``config:NAME`` as given, a model object by the SHA-256 of its config and weights."""
    if not isinstance(model, GroundingDinoForObjectDetection):
        text = str(model)
        return str(Path(text).resolve()) if Path(text).exists() else text
    digest = hashlib.sha256(json.dumps(model.config.to_hf_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"a model object (config and weights sha256 {digest.hexdigest()[:16]})"


def data_identity(dataset: Dataset) -> dict[str, Any]:
    """The source, image count and a SHA-256 of what is trained on: the label list and each
    sample's image (relative to the annotation file's folder, or the YOLO folder), size, boxes,
    labels, caption and phrases. A resume compares the digest, so a moved data folder resumes and
    an edited annotation file does not."""
    source = Path(dataset.source) if dataset.source else Path()
    base = source if source.is_dir() else source.parent
    digest = hashlib.sha256(json.dumps(list(dataset.names)).encode())
    for sample in dataset.samples:
        item = [
            Path(os.path.relpath(sample.image, base)).as_posix(),
            sample.width,
            sample.height,
            sample.boxes.tolist(),
            list(sample.labels),
            sample.caption,
            [[p.text, [list(span) for span in p.spans]] for p in sample.phrases],
        ]
        digest.update(json.dumps(item).encode() + b"\n")
    shown = str(source.resolve()) if dataset.source else "a Dataset"
    return {"source": shown, "images": len(dataset), "sha256": digest.hexdigest()}


def run_record(
    model: str | Path | GroundingDinoForObjectDetection, dataset: Dataset, settings: TrainSettings
) -> dict[str, Any]:
    """What ``OUT/train_settings.json`` holds: the model, the data and the ``TRAINED`` settings (as JSON reads them)."""
    trained = {k: v for k, v in asdict(settings).items() if k in TRAINED}
    record = {"gdino_train": 1, "model": model_identity(model), "data": data_identity(dataset), "settings": trained}
    loaded: dict[str, Any] = json.loads(json.dumps(record))
    return loaded


def saved_record(out: Path) -> dict[str, Any] | None:
    """The record of the run in ``out``; ``None`` when it holds none. A run of an earlier gdino has
    no ``train_settings.json``: its settings come from its newest checkpoint (its model and data are unknown)."""
    from gdino.checkpoint.saving import latest, load_state

    path = out / RUN_FILE
    if path.is_file():
        try:
            loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return {"unreadable": f"{path}: {e}"}
        return loaded
    found = latest(out) if out.is_dir() else None
    if found is None:
        return None
    return json.loads(json.dumps({"settings": load_state(found).get("settings", {})}, default=list))


def differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name: saved -> new"`` for each recorded model, data and ``TRAINED`` setting that differs."""
    if "unreadable" in saved:
        return [f"the saved settings cannot be read ({saved['unreadable']})"]
    found = []
    if "model" in saved and saved["model"] != new["model"]:
        found.append(f"model: {_short(saved['model'])} -> {_short(new['model'])}")
    if "data" in saved and saved["data"].get("sha256") != new["data"]["sha256"]:
        found.append(f"data: {_data_text(saved['data'])} -> {_data_text(new['data'])}")
    old, now = saved.get("settings", {}), new["settings"]
    for key in TRAINED:
        if key in old and old[key] != now[key]:
            found.append(f"{key} ({FLAGS.get(key, '--' + key.replace('_', '-'))}): {old[key]} -> {now[key]}")
    return found


def _short(text: object, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]


def _data_text(data: dict[str, Any]) -> str:
    return f"{_short(data.get('source'))} ({data.get('images')} images, sha256 {str(data.get('sha256'))[:12]})"


def _targets(out: Path, done: int, settings: TrainSettings) -> list[Path]:
    """Every checkpoint folder a run after epoch ``done`` may write (or clear): ``epoch-N/`` and
    ``last/``, each with the ``.tmp`` and ``.old`` folders ``save_pretrained`` passes through."""
    names = [f"epoch-{n}" for n in range(done + 1, settings.epochs + 1)] + ["last"]
    return [out / (name + suffix) for name in names for suffix in ("", ".tmp", ".old")]


def _run_folder(path: Path) -> bool:
    """Whether ``path`` is a checkpoint folder a gdino training run wrote: a real folder with only
    checkpoint files in it, a resume state among them (or a ``.tmp`` folder, written before its
    state), or an empty folder, which holds nothing to lose."""
    from gdino.checkpoint.saving import foreign_entries

    if path.is_symlink() or not path.is_dir() or foreign_entries(path):
        return False
    return (path / STATE_FILE).is_file() or path.name.endswith(".tmp") or not any(path.iterdir())


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _refuse_existing(paths: Sequence[Path]) -> None:
    """In an OUT that holds no run, nothing the run writes may be there already (an empty folder may)."""
    there = [p for p in paths if (p.exists() or p.is_symlink()) and not _empty_folder(p)]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise TrainError(
            f"{there[0]}{more} is already there and no gdino training run wrote it; move it, or use another --out"
        )


def _refuse_foreign(paths: Sequence[Path]) -> None:
    """Each checkpoint folder the run will replace must be one a gdino training run wrote."""
    from gdino.checkpoint.saving import foreign_entries

    for path in paths:
        if (path.exists() or path.is_symlink()) and not _run_folder(path):
            what = (
                f"holds {', '.join(foreign_entries(path)[:3]) or 'no resume state'}, "
                if path.is_dir() and not path.is_symlink()
                else "is not a folder, "
            )
            raise TrainError(
                f"{path} {what}which no gdino training run wrote, and the run would replace it; "
                "move it, or use another --out"
            )


def remove_run(out: Path, log: IO[str]) -> int:
    """Deletes the files of the run in ``out``: its settings, history and checkpoint folders (the
    checkpoint files in them; a folder that holds other files too keeps those). Returns how many."""
    from gdino.checkpoint.saving import CHECKPOINT_FILES, CHECKPOINT_NAME

    removed = 0
    for name in (RUN_FILE, HISTORY_FILE):
        for path in [out / name, *out.glob(f".{name}.*.tmp")]:  # the second: a write_atomic cut short
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
    for folder in sorted(out.iterdir()):
        stem = folder.name.removesuffix(".tmp").removesuffix(".old")
        if not CHECKPOINT_NAME.fullmatch(stem) or folder.is_symlink() or not folder.is_dir():
            continue
        if not (folder / STATE_FILE).is_file() and not folder.name.endswith(".tmp"):
            continue  # e.g. a model someone saved there: no training run wrote it
        for path in folder.iterdir():
            if path.name in CHECKPOINT_FILES and path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
        if any(folder.iterdir()):
            print(f"train: kept {folder} (it holds files no gdino training run wrote)", file=log, flush=True)
        else:
            folder.rmdir()
    return removed


def claim(
    out: Path, record: dict[str, Any], settings: TrainSettings, resume: bool, overwrite: bool, log: IO[str]
) -> tuple[Path | None, dict[str, Any] | None]:
    """Decides what to do with ``out``; returns the checkpoint to resume from and its state (or
    ``None, None``: start afresh). Changes nothing in ``out`` unless ``overwrite`` (the old run's
    files are then removed), and nothing at all when it refuses.

    Raises:
        TrainError: ``out`` holds a run, without ``resume`` or ``overwrite``; the run's settings differ
            (with ``resume``); a file in the way that no gdino training run wrote.
    """
    from gdino.checkpoint.saving import latest, load_state

    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is not a folder")
    saved = saved_record(out)
    if saved is None:
        _refuse_existing([out / RUN_FILE, out / HISTORY_FILE, *_targets(out, 0, settings)])
        if resume:
            print(f"train: nothing to resume in {out}; starting afresh", file=log, flush=True)
        return None, None
    if resume:
        changed = differences(saved, record)
        if changed:
            raise TrainError(
                f"{out} holds a run with other settings: {'; '.join(changed)}; resume it with its settings, "
                "give --overwrite to start over, or use another --out"
            )
        found = latest(out)
        if found is None:
            print(f"train: no checkpoint in {out} yet; starting the run afresh", file=log, flush=True)
            return None, None
        return found, load_state(found)
    if not overwrite:
        raise TrainError(
            f"{out} holds a training run; give --resume to continue it, --overwrite to start over "
            "(removing its checkpoints and history), or use another --out"
        )
    _refuse_foreign(_targets(out, 0, settings))
    removed = remove_run(out, log)
    print(f"train: --overwrite: removed the run in {out} ({removed} files)", file=log, flush=True)
    return None, None


def _write_history(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """``OUT/history.jsonl`` as the records of the finished epochs (none: no file)."""
    from gdino.utils.files import write_atomic

    path = out / HISTORY_FILE
    if history:
        write_atomic(path, "".join(json.dumps(record) + "\n" for record in history))
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- training


def start(
    data: str | Path | Dataset,
    model: str | Path | GroundingDinoForObjectDetection,
    out: str | Path,
    settings: TrainSettings,
    resume: bool = False,
    log: IO[str] = sys.stderr,
) -> Run:
    """Everything set up to train: data, model (or the last checkpoint's), optimiser, schedule.

    Reads ``out`` (with ``resume``, its newest checkpoint) but checks and writes nothing there: ``train`` does."""
    from gdino.checkpoint.saving import latest, load_state

    settings.check()
    dataset = load_data(data, log)
    found = latest(Path(out)) if resume and Path(out).is_dir() else None
    return build_run(dataset, model, Path(out), settings, found, load_state(found) if found else None, log)


def build_run(
    dataset: Dataset,
    model: str | Path | GroundingDinoForObjectDetection,
    out: Path,
    settings: TrainSettings,
    found: Path | None,
    state: dict[str, Any] | None,
    log: IO[str],
) -> Run:
    """The run: the model (``found``'s, restored to ``state``, when resuming), optimiser, schedule."""
    spec = model if isinstance(model, (str, Path)) else ""
    if found is not None:
        print(f"train: resuming from {found}", file=log, flush=True)
        model = GroundingDinoForObjectDetection.from_pretrained(found)
    if not isinstance(model, GroundingDinoForObjectDetection):
        model = build_model(model, settings.seed)
    model.processor = set_image_size(model.processor, settings.image_size)
    if settings.aux_loss is not None:
        model.config = replace(model.config, auxiliary_loss=settings.aux_loss)  # what the loss reads
    model.to(settings.device).train()
    freeze(model, settings.freeze)
    optimizer = make_optimizer(model, settings, from_scratch=str(spec).startswith("config:"))
    steps_per_epoch = math.ceil(len(dataset) / settings.batch_size)
    scheduler = make_scheduler(optimizer, settings.epochs * steps_per_epoch, settings)
    scaler = torch.amp.GradScaler("cuda") if settings.dtype == "fp16" and model.device.type == "cuda" else None
    captions = CaptionBuilder(model.processor.tokenizer, dataset.names, settings.max_labels)
    run = Run(
        model, optimizer, scheduler, dataset, captions, make_augment(settings), settings, out, Position(), scaler, log
    )
    if state is not None:
        restore(run, state)
    else:
        torch.manual_seed(settings.seed)
    return run


def train(
    data: str | Path | Dataset,
    model: str | Path | GroundingDinoForObjectDetection,
    out: str | Path,
    settings: TrainSettings | None = None,
    val: str | Path | None = None,
    resume: bool = False,
    log: IO[str] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Trains ``model`` on ``data``, writing ``OUT/epoch-N/`` after each epoch and its record (mean
    losses, and validation metrics when ``val``, a COCO file, is given) to ``OUT/history.jsonl``.

    Args:
        data: a COCO ``.json``, ODVG ``.jsonl``, YOLO folder, or a read ``Dataset``.
        model: a model, a hub id / directory / checkpoint file, or ``config:shapes`` (random init).
        out: the output folder; one that holds a run needs ``resume`` or ``overwrite``.
        settings: how to train (the defaults when ``None``).
        val: COCO annotations to compute mAP on after each epoch.
        resume: continue the run in ``out`` from its newest checkpoint (refused if its model, data
            or a ``TRAINED`` setting differs; if it has finished, do nothing; if ``out`` holds no
            run, start afresh). ``history.jsonl`` is then put back to the checkpoint's history.
        log: where progress goes (stderr when None).
        overwrite: start over in an ``out`` that holds a run, removing its files first (never others).

    Raises:
        TrainError: a bad setting, or an ``out`` that ``claim`` refuses.
    """
    settings = settings if settings is not None else TrainSettings()
    log = log if log is not None else sys.stderr
    out = Path(out)
    if resume and overwrite:
        raise TrainError("give --resume or --overwrite, not both")
    settings.check()
    dataset = load_data(data, log)
    record = run_record(model, dataset, settings)
    found, state = claim(out, record, settings, resume, overwrite, log)
    position = Position(**state["position"]) if state is not None else Position()
    if state is not None and finished(position, settings):
        done = _progress(position, settings)
        print(f"train: the run in {out} has finished ({done}); nothing to do", file=log, flush=True)
        return TrainResult(found, position, list(state.get("history", [])), already_finished=True)
    if resume:
        _refuse_foreign(_targets(out, position.epoch, settings))
    run = build_run(dataset, model, out, settings, found, state, log)
    run.record = record
    if state is None or "history" in state:  # a state of an earlier gdino: its history.jsonl is kept
        _write_history(out, run.history)
    return _loop(run, val)


def _progress(position: Position, settings: TrainSettings) -> str:
    """How far a finished run went, for messages."""
    if position.epoch >= settings.epochs:
        return f"all {settings.epochs} epochs, step {position.step}"
    return f"step {position.step}, its max_steps, in epoch {position.epoch + 1} of {settings.epochs}"


def _loop(run: Run, val: str | Path | None) -> TrainResult:
    """The epochs from ``run.position`` on, each checkpointed and recorded in ``OUT/history.jsonl``."""
    settings, log = run.settings, run.log
    result = TrainResult(None, run.position)
    while run.position.epoch < settings.epochs:
        means, stopped = run_epoch(run)
        if not stopped:
            run.position.epoch, run.position.offset = run.position.epoch + 1, 0
        record: dict[str, Any] = {
            "epoch": run.position.epoch,
            "step": run.position.step,
            "seconds": round(run.seconds(), 1),
            **means,
        }
        if val is not None:
            record["val"] = validate(run.model, Path(val), settings.val_limit, log)
        if not stopped or finished(run.position, settings):  # a stop by time: until a resume ends the epoch
            run.history.append(record)
        if not stopped:
            run.sums, run.epoch_steps = {}, 0
        result.checkpoint = checkpoint(run, "last" if stopped else f"epoch-{run.position.epoch}")
        result.history.append(record)
        _append_history(run.out / HISTORY_FILE, record)
        print(f"train: {result.checkpoint.name}: " + _summary(record), file=log, flush=True)
        if stopped:
            break
    return result


def _append_history(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _summary(record: dict[str, Any]) -> str:
    text = f"loss {record.get('loss', float('nan')):.4f} ({record['seconds']:.0f} s)"
    if "val" in record:
        text += f", val AP {record['val']['AP']:.3f} AP50 {record['val']['AP50']:.3f}"
    return text
