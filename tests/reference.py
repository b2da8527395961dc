"""Builds the reference side of the parity tests: transformers' implementation with test weights.

Random init is degenerate (the box heads' last layers are zero, sampling offsets are a fixed
pattern), so every parameter gets seeded noise; the final decoder norm and the encoder-output norm
are shrunk so that logits fall in a realistic few-unit range instead of hundreds.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]  # the repository
DATA = Path(__file__).parent / "data"
VOCAB = Path(__file__).parents[1] / "src" / "gdino" / "data" / "bert-base-uncased-vocab.txt"
NOISE = 0.02
NORM_SHRINK = 0.1


def reference_processor():
    from transformers import BertTokenizer, GroundingDinoImageProcessorPil, GroundingDinoProcessor

    return GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=BertTokenizer(str(VOCAB)))


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded noise on every parameter, then the two output norms shrunk (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * NOISE)
        inner = model.model
        for norm in (inner.decoder.layer_norm, inner.enc_output_norm):
            norm.weight.mul_(NORM_SHRINK)
            norm.bias.mul_(NORM_SHRINK)


def noised_reference(config, noise: float, seed: int = 0, noise_seed: int = 1):
    """transformers' ``GroundingDinoForObjectDetection`` (seeded init), in eval mode, with ``noise``
    times N(0, 1) added to every parameter from its own generator: random init zeroes the box heads'
    last layers, the sampling offsets and Swin's position tables, and noise makes every weight matter.
    The component tests compare our modules with it, loaded with the same weights."""
    from transformers import GroundingDinoForObjectDetection

    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return model


def build_reference(config=None, seed: int = 0):
    """transformers' GroundingDinoForObjectDetection (or MMGroundingDinoForObjectDetection, for an
    ``MMGroundingDinoConfig``) with test weights, in eval mode."""
    from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection

    torch.manual_seed(seed)
    config = config or GroundingDinoConfig()
    cls = (
        MMGroundingDinoForObjectDetection
        if config.model_type == "mm-grounding-dino"
        else GroundingDinoForObjectDetection
    )
    model = cls(config)
    perturb_(model, seed)
    return model.eval()


def as_mm_config(config, share: bool = True, **overrides):
    """An ``MMGroundingDinoConfig`` with the settings of a ``GroundingDinoConfig`` (and ``overrides``);
    ``share``: decoder_bbox_embed_share and decoder_cls_embed_share."""
    from transformers import MMGroundingDinoConfig

    settings = {
        k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version", "architectures")
    }
    settings.update(decoder_bbox_embed_share=share, decoder_cls_embed_share=share, **overrides)
    return MMGroundingDinoConfig(**settings)


def save_reference(model, directory: Path) -> Path:
    """Writes the model and its processor in the Hugging Face layout (what the hub serves)."""
    model.save_pretrained(directory)
    reference_processor().save_pretrained(directory)
    return directory


def small_reference_config(backbone: dict | None = None, **overrides):
    """A narrow, shallow reference configuration (fast), in transformers' terms; ``overrides``
    replace its top-level settings (e.g. ``decoder_layers=3``), ``backbone`` its Swin settings."""
    from transformers import GroundingDinoConfig

    settings = {
        "encoder_layers": 1,
        "decoder_layers": 2,
        "d_model": 64,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "num_queries": 50,
    }
    return GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 32,
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 2, 4],
            "out_indices": [2, 3, 4],
            "out_features": ["stage2", "stage3", "stage4"],
            "window_size": 7,
            **(backbone or {}),
        },
        text_config={
            "model_type": "bert",
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        **{**settings, **overrides},
    )


def prefill_hub_cache(directory: Path, cache: Path, repo_id: str) -> Path:
    """Lays ``directory``'s files out as huggingface_hub's cache holds a downloaded snapshot."""
    revision = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in directory.iterdir():
        (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot
