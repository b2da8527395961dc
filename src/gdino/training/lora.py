"""Low-rank adapters (LoRA, Hu et al. 2021) on chosen linear layers, and merging them back.

    from gdino.training.lora import DEFAULT_TARGETS, apply_lora, merge_lora
    names = apply_lora(model, DEFAULT_TARGETS, rank=8, alpha=8.0)  # only the adapters train now
    ...                                                             # train
    merge_lora(model)                                               # plain nn.Linear, W + alpha/r B A

``LoRALinear`` wraps an ``nn.Linear``: its weight W stays frozen and a low-rank update
``alpha / r * B @ A`` is learned, A (r x in, drawn as ``nn.Linear`` draws its weights) and
B (out x r, zeros), so a model starts exactly as the base model. Several modules of Grounding
DINO read a linear layer's ``weight`` and ``bias`` themselves rather than calling it (the fusion
layers' re-associated bi-attention, the recomputed feed-forward block, the deformable attention's
concatenated offset and weight projections): ``LoRALinear.weight`` is therefore the effective
weight ``W + alpha/r B A``, so every such reader sees the adapted layer, while ``forward`` (the
other readers) adds the low-rank path without forming it.

Why not PEFT: peft 0.21 requires ``transformers`` and ``accelerate`` (and psutil, pyyaml, tqdm)
at run time, which gdino does not otherwise need, and its LoRA layers adapt ``forward`` only:
their ``weight`` is the base layer's, so the direct readers above would silently run the base
model. The implementation here is ~100 lines with the same initialisation (B zero, A uniform).

Checkpoints stay plain: ``merged(model)`` swaps every wrapper for an ``nn.Linear`` holding
``W + alpha/r B A`` for as long as a checkpoint is written (the wrappers, and so the optimiser's
parameters, come back unchanged), and the adapters are written beside it (``adapter_files``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.checkpoint.saving import ADAPTER_CONFIG_FILE, ADAPTERS_FILE
from gdino.training.settings import TrainError, TrainSettings

# Where adapters go unless ``--lora-targets`` says otherwise: the feature enhancer's fusion layers
# (all six projections of the image-text bi-attention), its text layers (self-attention output
# and feed-forward) and image layers (deformable attention's value and output projections and the
# feed-forward), the decoder's layers (self-attention and text cross-attention outputs, deformable
# value and output projections, feed-forward) and ``feat_map``, BERT's projection into the model
# width. That is every place where image and text meet or where queries are refined. Left out:
# Swin and BERT (general features the open vocabulary rests on; the image side's projections into
# the model width are 1x1 convolutions, not linear layers), the deformable attention's sampling
# offsets and attention weights (where to look: a geometric prior), and the box heads, which every
# class shares: adapting them moves the boxes of the classes the fine-tune does not see (add
# ``bbox_embed`` to the targets to adapt them too). The class head has no weights (a dot product
# with the text). The fused text self-attention input projection is a parameter, not a layer.
DEFAULT_TARGETS = (
    "feat_map",
    "transformer.encoder.fusion_layers",
    "transformer.encoder.text_layers",
    "transformer.encoder.layers.*.self_attn.value_proj",
    "transformer.encoder.layers.*.self_attn.output_proj",
    "transformer.encoder.layers.*.linear[12]",
    "transformer.decoder.layers.*.out_proj",
    "transformer.decoder.layers.*.cross_attn.value_proj",
    "transformer.decoder.layers.*.cross_attn.output_proj",
    "transformer.decoder.layers.*.linear[12]",
)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trained low-rank update: ``y = x (W + s B A)^T + b``, ``s = alpha / r``.

    Args:
        base: the layer to adapt (kept as ``self.base``; its parameters stop training).
        rank: r, the update's rank.
        alpha: the update's scale is ``alpha / rank``.
        generator: draws A (CPU), so that the start does not depend on the global random state.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        for param in base.parameters():
            param.requires_grad_(False)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's (kaiming uniform, a = sqrt(5))
        a = (torch.rand(rank, self.in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))  # (out, r)

    @property
    def weight(self) -> Tensor:
        """The effective weight ``W + s B A`` (out, in), for code that reads a layer's weight."""
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out); the low-rank path runs at width r, no (out, in) matrix is formed."""
        return F.linear(x, self.base.weight, self.base.bias) + self.scale * F.linear(
            F.linear(x, self.lora_a), self.lora_b
        )

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the weight ``W + s B A`` (new tensors; this layer is unchanged)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear


# --------------------------------------------------------------------------- choosing layers


def linear_names(model: nn.Module) -> list[str]:
    """The names of the model's ``nn.Linear`` layers (a shared layer under its first name)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def matching(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The linear layers the patterns select, in model order.

    A pattern selects a layer whose name it matches (``fnmatch``: ``*`` also crosses dots,
    ``[12]`` one of the characters) or a layer inside a module it names:
    ``transformer.decoder`` selects every linear layer of the decoder.

    Raises:
        TrainError: no patterns, a pattern that selects nothing (some layer names are listed), or a
            model that already has adapters.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise TrainError("the model already has LoRA adapters; merge them (merge_lora) before adding others")
    names = linear_names(model)
    if not patterns:
        raise TrainError("no LoRA target patterns given")
    for pattern in patterns:
        if not any(_selects(pattern, name) for name in names):
            raise TrainError(
                f"--lora-targets {pattern!r} matches no linear layer of the model; its linear layers are "
                f"named {', '.join(_generic(names))} ({len(names)} in all)"
            )
    return [name for name in names if any(_selects(p, name) for p in patterns)]


def _selects(pattern: str, name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, pattern + ".*")


def _generic(names: Sequence[str]) -> list[str]:
    """Names with their layer numbers as ``*``, each once: ``transformer.decoder.layers.*.linear1``."""
    return list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names))


def _references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (parent, attribute) that holds each child module, by the child's id (shared ones too)."""
    found: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attribute, child in parent.named_children():
            found.setdefault(id(child), []).append((parent, attribute))
    return found


def _swap(refs: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    for parent, attribute in refs.get(id(old), []):
        setattr(parent, attribute, new)


# --------------------------------------------------------------------------- adding and merging


def apply_lora(model: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Wraps each linear layer the ``targets`` patterns select (see ``matching``) in a
    ``LoRALinear`` and turns off the gradients of every other parameter; returns the wrapped names.

    ``seed`` draws the A matrices, layer after layer in model order.

    Raises:
        TrainError: ``rank`` below 1, ``alpha`` not positive, or a pattern that selects nothing.
    """
    if rank < 1:
        raise TrainError(f"the LoRA rank must be at least 1, not {rank}")
    if not alpha > 0:
        raise TrainError(f"the LoRA alpha must be positive, not {alpha}")
    names = matching(model, targets)
    for param in model.parameters():
        param.requires_grad_(False)
    refs = _references(model)
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        _swap(refs, base, LoRALinear(base, rank, alpha, generator))
    return names


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's adapted layers by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> list[str]:
    """Replaces every ``LoRALinear`` by a plain ``nn.Linear`` holding ``W + alpha/r B A`` (frozen,
    as the base was); returns the merged names. The model is then a plain Grounding DINO again."""
    found = adapters(model)
    refs = _references(model)
    for layer in found.values():
        _swap(refs, layer, layer.merged())
    return list(found)


@contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its adapters merged, for as long as the block runs (to save it as a plain
    checkpoint); afterwards the same ``LoRALinear`` objects are back, untouched. Without
    adapters, the model as it is."""
    found = adapters(model)
    refs = _references(model)
    plain = {name: layer.merged() for name, layer in found.items()}
    for name, layer in found.items():
        _swap(refs, layer, plain[name])
    try:
        yield model
    finally:
        after = _references(model)
        for name, layer in found.items():
            _swap(after, plain[name], layer)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights (``NAME.lora_a`` (r, in), ``NAME.lora_b`` (out, r), gdino's module
    names), CPU copies."""
    state: dict[str, Tensor] = {}
    for name, layer in adapters(model).items():
        state[f"{name}.lora_a"] = layer.lora_a.detach().to("cpu", copy=True).contiguous()
        state[f"{name}.lora_b"] = layer.lora_b.detach().to("cpu", copy=True).contiguous()
    return state


def load_lora_state(model: nn.Module, state: dict[str, Tensor], bases: dict[str, Tensor] | None = None) -> None:
    """Copies adapter weights (``lora_state_dict``'s) and, if given, the frozen base weights
    (``NAME.weight``) into the model's ``LoRALinear`` layers; every name must match.

    Raises:
        TrainError: the names differ from the model's adapters.
    """
    layers = adapters(model)
    expected = {f"{n}.lora_{x}" for n in layers for x in "ab"}
    if set(state) != expected or (bases is not None and set(bases) != {f"{n}.weight" for n in layers}):
        differ = sorted(set(state) ^ expected)
        raise TrainError(f"the saved adapters do not fit the model's: {', '.join(differ[:6]) or 'base weights'}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_a.copy_(state[f"{name}.lora_a"])
            layer.lora_b.copy_(state[f"{name}.lora_b"])
            if bases is not None:
                layer.base.weight.copy_(bases[f"{name}.weight"])


# --------------------------------------------------------------------------- the trainer's use


def effective_alpha(settings: TrainSettings) -> float:
    """``--lora-alpha``, or the rank when unset (scale 1: ``--lr`` alone sets the adapters' steps)."""
    return float(settings.lora_alpha) if settings.lora_alpha is not None else float(settings.lora_rank)


def adapt(model: nn.Module, settings: TrainSettings, state: dict[str, Any] | None = None) -> list[str]:
    """With ``settings.lora_rank``, wraps the target layers (``lora_targets``, else
    ``DEFAULT_TARGETS``) and freezes everything else; with a resume ``state``, puts back its
    adapters and the base weights (the checkpoint it resumes holds them merged). Returns the
    wrapped names (none with rank 0)."""
    if not settings.lora_rank:
        return []
    targets = settings.lora_targets or DEFAULT_TARGETS
    names = apply_lora(model, targets, settings.lora_rank, effective_alpha(settings), settings.seed)
    if state is not None and "lora" in state:
        load_lora_state(model, state["lora"]["adapters"], state["lora"]["bases"])
    return names


def resume_state(model: nn.Module) -> dict[str, Any]:
    """What a resume needs of the adapters: their weights and the base weights under them."""
    bases = {f"{n}.weight": m.base.weight.detach().to("cpu", copy=True) for n, m in adapters(model).items()}
    return {"adapters": lora_state_dict(model), "bases": bases}


def adapter_files(model: nn.Module, settings: TrainSettings, base_model: str) -> dict[str, bytes]:
    """``adapters.safetensors`` (``lora_state_dict``) and ``lora_config.json`` (rank, alpha,
    targets, the adapted layers and the base model), by file name."""
    from safetensors.torch import save

    config = {
        "gdino_lora": 1,
        "rank": settings.lora_rank,
        "alpha": effective_alpha(settings),
        "targets": list(settings.lora_targets or DEFAULT_TARGETS),
        "modules": list(adapters(model)),
        "base_model": base_model,
        "names": "gdino",  # module names as gdino's model names them, not transformers'
    }
    return {
        ADAPTERS_FILE: save(lora_state_dict(model), metadata={"format": "pt"}),
        ADAPTER_CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode(),
    }


def load_adapters(model: nn.Module, directory: Any) -> list[str]:
    """Adds the adapters a training checkpoint saved (``adapter_files``) to ``model``, its base
    model; returns the adapted names. ``merge_lora`` then gives the checkpoint's weights."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(directory)
    config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    names = apply_lora(model, config["modules"], int(config["rank"]), float(config["alpha"]))
    load_lora_state(model, load_file(str(folder / ADAPTERS_FILE)))
    return names


def check_targets(model: nn.Module, settings: TrainSettings) -> list[str]:
    """The layers ``settings`` would adapt in ``model`` (its modules suffice: a meta-device
    skeleton), to refuse a target that selects nothing before any work.

    Raises:
        TrainError: a pattern that selects no linear layer.
    """
    return matching(model, settings.lora_targets or DEFAULT_TARGETS) if settings.lora_rank else []


def describe(model: nn.Module, names: Sequence[str], settings: TrainSettings) -> str:
    """One log line: rank, alpha, how many layers, and the trainable parameters among all."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"LoRA rank {settings.lora_rank} (alpha {effective_alpha(settings):g}) on {len(names)} linear layers: "
        f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / max(1, total):.2f}%)"
    )
