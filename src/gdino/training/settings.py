"""How to train: ``TrainSettings`` (and its ``check``) and ``TrainError``.

    from gdino.training.settings import TrainSettings
    settings = TrainSettings(epochs=8, image_size=256)

Which of the settings a resumed run may not change is ``gdino.training.runs.TRAINED``.
"""

from __future__ import annotations

from dataclasses import dataclass

FREEZABLE = ("backbone", "text")


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
        keep_classes: the base model's classes, which fine-tuning should not forget (``replay``
            and ``distill`` use them; empty: the base checkpoint's ``classes.txt``, if it has one).
        replay: pseudo-label replay: the base model labels the training images with
            ``keep_classes`` (boxes scoring ``replay_threshold`` or more), and those boxes join the
            targets (``gdino.training.replay``).
        replay_threshold: the least score of a replayed box.
        distill: weight of the distillation loss (0: off): the frozen base model's scores of
            ``keep_classes`` and boxes, on the same inputs (``gdino.training.distill``).
        aux_loss: also a loss on every decoder layer but the last (the original recipe does);
            ``None`` keeps the model config's ``auxiliary_loss`` (the published config has it off,
            transformers' default). The saved checkpoints' configs record the choice.
        lora_rank: train low-rank adapters of this rank on ``lora_targets`` and nothing else
            (0: off; ``gdino.training.lora``). Checkpoints hold the merged weights, the adapters
            beside them.
        lora_alpha: the adapters' scale is ``lora_alpha / lora_rank``; ``None``: the rank (scale 1).
        lora_targets: patterns of the linear layers to adapt (``gdino.training.lora.matching``);
            empty: ``gdino.training.lora.DEFAULT_TARGETS``.
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
    keep_classes: tuple[str, ...] = ()
    replay: bool = False
    replay_threshold: float = 0.3
    distill: float = 0.0
    aux_loss: bool | None = None
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ()

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
        if not 0.0 < self.replay_threshold < 1.0:
            raise TrainError(f"replay threshold must be between 0 and 1, not {self.replay_threshold}")
        if self.distill < 0:
            raise TrainError(f"distill is a loss weight (0: off), not {self.distill}")
        if self.lora_rank < 0:
            raise TrainError(f"the LoRA rank must be 0 (off) or a positive rank, not {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise TrainError(f"the LoRA alpha must be positive, not {self.lora_alpha}")
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_targets):
            raise TrainError("--lora-alpha and --lora-targets need --lora-rank")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise TrainError("epochs and batch size must be at least 1 and lr positive")
