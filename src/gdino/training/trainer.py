"""The training loop: the model to train, the step, precision, checkpoints, validation and resuming.

    from gdino.training.settings import TrainSettings
    from gdino.training.trainer import train
    result = train("train.json", "config:shapes", "runs/shapes", TrainSettings(epochs=8, image_size=256))

The recipe is Open-GroundingDino's fine-tuning one: AdamW (weight decay 1e-4), a lower learning
rate for the image backbone and the text encoder (``lr_backbone`` 1e-5 against 1e-4), gradient
clipping at 0.1 (DINO's ``clip_max_norm``), a step decay (x0.1) late in training, or a cosine
schedule, after an optional linear warm-up. The optimiser and the schedule are built in
``gdino.training.optimizer``.

Each epoch writes ``OUT/epoch-N/`` in the Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer and preprocessor files), which both ``gdino`` and transformers'
``GroundingDinoForObjectDetection.from_pretrained`` load, plus ``trainer_state.pt`` (optimiser,
schedule, RNG, data position) that ``resume`` continues from; ``save_every`` steps also writes
``OUT/last/``. The data order of an epoch depends only on ``(seed, epoch)`` (see ``loader``), so a
resumed run on CPU ends with exactly the weights of an uninterrupted one; the resume state also
carries the epoch's running loss sums and the history so far, so ``OUT/history.jsonl`` of a
resumed run is the uninterrupted run's too (but for ``seconds``).

What an OUT holds, and whether a run may write it (``resume``, ``overwrite``, files that no gdino
training run wrote), is ``gdino.training.runs``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
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
from gdino.training import lora
from gdino.training.augment import Augment, AugmentSettings
from gdino.training.captions import CaptionBuilder
from gdino.training.distill import Distiller, distilled_outputs
from gdino.training.loader import Example, collate, epoch_order, examples
from gdino.training.optimizer import freeze, make_optimizer, make_scheduler
from gdino.training.replay import with_classes
from gdino.training.runs import (
    HISTORY_FILE,
    RUN_FILE,
    Position,
    checkpoint_folders,
    claim,
    finished,
    how_far,
    refuse_foreign,
    run_record,
    write_history,
)
from gdino.training.samples import Dataset, Problem
from gdino.training.settings import TrainError, TrainSettings

logger = logging.getLogger(__name__)

PRESETS: dict[str, Callable[[], GroundingDinoConfig]] = {
    "shapes": GroundingDinoConfig.shapes,
    "tiny": GroundingDinoConfig.tiny,
    "small_test": GroundingDinoConfig.small_test,
}


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


def skeleton(spec: str | Path | GroundingDinoForObjectDetection) -> nn.Module:
    """The model ``build_model`` would build, as modules without weights (meta device): its
    architecture read from the preset or the checkpoint's config, no weights loaded."""
    if isinstance(spec, nn.Module):
        return spec
    from gdino.checkpoint.loading import read_config
    from gdino.utils.hub import resolve

    text = str(spec)
    name = text.removeprefix("config:")
    if text.startswith("config:") and name not in PRESETS:
        raise TrainError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    config = PRESETS[name]() if text.startswith("config:") else read_config(resolve(text))
    with torch.device("meta"):
        return GroundingDinoForObjectDetection(config, init_weights=False)


def from_config(config: GroundingDinoConfig, seed: int = 0) -> GroundingDinoForObjectDetection:
    """A randomly initialised model of ``config`` with the packaged processor."""
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config)
    init_weights(model, seed)
    model.processor = GroundingDinoProcessor.default(config.max_text_len)
    return model


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
    distiller: Distiller | None = None,
) -> dict[str, float]:
    """Forward with labels (and with a ``distiller``, its loss too), backward, clip, step; returns
    the loss terms as floats."""
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
        if distiller is not None:
            captions = [ex.caption for ex in batch]
            outputs = distilled_outputs(model, distiller, inputs, labels, captions, denoising)
        else:
            outputs = model(**inputs, labels=labels, denoising=denoising)
    loss, loss_dict = outputs.loss, outputs.loss_dict
    assert loss is not None and loss_dict is not None
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
    terms = {k: float(v.detach()) for k, v in loss_dict.items()}
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
    distiller: Distiller | None = None  # the frozen base model, with ``distill``

    def out_of_time(self) -> bool:
        s = self.settings
        return (s.max_steps is not None and self.position.step >= s.max_steps) or (
            s.max_minutes is not None and time.monotonic() - self.began >= 60 * s.max_minutes
        )

    def seconds(self) -> float:
        """Training time in all, over every session of the run."""
        return self.seconds_before + time.monotonic() - self.began


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
    from gdino.checkpoint.saving import CLASSES_FILE, ORIGINAL_FILE, classes_file, export_original, save_pretrained
    from gdino.utils.files import write_atomic

    if run.record and not (run.out / RUN_FILE).is_file():
        write_atomic(run.out / RUN_FILE, json.dumps(run.record, indent=2) + "\n")
    files = {CLASSES_FILE: classes_file(run.dataset.names)}  # the next fine-tune's default
    state = state_of(run)
    if lora.adapters(run.model):  # the weights are saved merged; the adapters beside them and, unmerged, in the state
        state["lora"] = lora.resume_state(run.model)
        files.update(lora.adapter_files(run.model, run.settings, str(run.record.get("model", ""))))
    with lora.merged(run.model):
        directory = save_pretrained(run.model, run.out / name, run.model.processor, state, files)
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
            terms = train_step(run.model, batch, run.optimizer, run.scheduler, s, run.scaler, run.distiller)
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
    adapted = lora.adapt(model, settings, state)  # with --lora-rank: only the adapters train from here
    if adapted:
        print(f"train: {lora.describe(model, adapted, settings)}", file=log, flush=True)
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
    settings = keep_classes_of(settings, model)
    if settings.lora_rank:  # a LoRA target that selects nothing: refused before any work
        lora.check_targets(skeleton(model), settings)
    dataset = load_data(data, log)
    record = run_record(model, dataset, settings)
    found, state = claim(out, record, settings, resume, overwrite, log)
    position = Position(**state["position"]) if state is not None else Position()
    if state is not None and finished(position, settings):
        done = how_far(position, settings)
        print(f"train: the run in {out} has finished ({done}); nothing to do", file=log, flush=True)
        return TrainResult(found, position, list(state.get("history", [])), already_finished=True)
    if resume:
        refuse_foreign(checkpoint_folders(out, position.epoch, settings))
    user_names = dataset.names
    base = functools.cache(lambda: base_model(model, settings))  # loaded once, if replay or distill asks
    if settings.replay:
        dataset = replayed(dataset, base, out, model, settings, log)
    elif settings.distill:
        dataset = with_classes(dataset, settings.keep_classes)
    run = build_run(dataset, model, out, settings, found, state, log)
    if settings.distill:
        kept_only = frozenset(settings.keep_classes) - frozenset(user_names)
        teacher = base()
        run.distiller = Distiller(teacher, dataset.names, kept_only, settings.distill, ignore=not settings.replay)
    run.record = record
    if state is None or "history" in state:  # a state of an earlier gdino: its history.jsonl is kept
        write_history(out, run.history)
    return _loop(run, val)


def keep_classes_of(settings: TrainSettings, model: str | Path | GroundingDinoForObjectDetection) -> TrainSettings:
    """``settings`` with ``keep_classes`` filled from the base checkpoint's ``classes.txt`` when
    replay or distillation needs them and none were given.

    Raises:
        TrainError: replay or distillation from random weights, or with no classes to keep.
    """
    from gdino.training.replay import read_classes

    if not (settings.replay or settings.distill):
        return settings
    if str(model).startswith("config:"):
        raise TrainError("replay and distillation keep what a trained base model knows; a config: preset knows nothing")
    classes = settings.keep_classes or read_classes(model)
    if not classes:
        raise TrainError(
            "replay and distillation need the base model's classes: give --keep-classes (a file, one per line, "
            "or a comma list); this checkpoint has no classes.txt"
        )
    return replace(settings, keep_classes=tuple(classes))


def base_model(
    model: str | Path | GroundingDinoForObjectDetection, settings: TrainSettings
) -> GroundingDinoForObjectDetection:
    """The model before fine-tuning, frozen, at the training image size: what replay and distillation ask."""
    import copy

    if isinstance(model, GroundingDinoForObjectDetection):
        base = copy.deepcopy(model)
    else:
        base = GroundingDinoForObjectDetection.from_pretrained(model)
    base.processor = set_image_size(base.processor, settings.image_size)
    base.to(settings.device).eval().requires_grad_(False)
    return base


def replayed(
    dataset: Dataset,
    base: Callable[[], GroundingDinoForObjectDetection],
    out: Path,
    model: str | Path | GroundingDinoForObjectDetection,
    settings: TrainSettings,
    log: IO[str],
) -> Dataset:
    """The data set with ``base()``'s pseudo-labels of ``keep_classes`` (cached in OUT: then ``base``
    is not called); ``model`` is the run's model as given, its identity recorded with the cache."""
    from gdino.training.replay import REPLAY_FILE, pseudo_label
    from gdino.training.runs import model_identity

    wider = pseudo_label(
        dataset,
        base,
        settings.keep_classes,
        settings.replay_threshold,
        cache=out / REPLAY_FILE,
        log=log,
        base_name=model_identity(model),
    )
    added = sum(len(s.labels) for s in wider.samples) - sum(len(s.labels) for s in dataset.samples)
    print(f"train: replay: {added} boxes of {len(settings.keep_classes)} kept classes added", file=log, flush=True)
    return wider


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
