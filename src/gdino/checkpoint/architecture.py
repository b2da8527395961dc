"""The architecture of an original ``.pth`` checkpoint, read from its tensors.

The original repository's files (``groundingdino_swint_ogc.pth``, ``groundingdino_swinb_cogcoor.pth``)
carry no ``config.json``: the Swin size, the text encoder, the transformer's widths and depths and
the number of feature levels are read off the tensors' names and shapes instead. What shapes
cannot tell (the attention heads of the transformer, its sampling points, BERT's heads) is the
published value every Grounding DINO checkpoint uses (8 heads, 4 points, 64 channels per BERT
head), checked against the shapes it must fit.

A file of another model family (a Segment Anything checkpoint, a DETR with a ResNet backbone) is
refused with what it holds.
"""

from __future__ import annotations

import math
import re

import torch

from gdino.models.grounding_dino.config import BertConfig, GroundingDinoConfig, SwinConfig

StateDict = dict[str, torch.Tensor]

SWIN = "backbone.0."
# What a Grounding DINO checkpoint in the original layout must hold.
REQUIRED = (
    SWIN + "patch_embed.proj.weight",
    "bert.embeddings.word_embeddings.weight",
    "transformer.tgt_embed.weight",
    "transformer.level_embed",
)
# Other families' tell-tale prefixes, for the message.
OTHER_FAMILIES = {
    "image_encoder.": "a Segment Anything (SAM) checkpoint",
    "sam_mask_decoder.": "a SAM 2 checkpoint",
    "backbone.0.body.": "a DETR-style checkpoint with a ResNet backbone",
    "backbone.stages.": "an mmdetection checkpoint",
}
TRANSFORMER_HEADS = 8  # every published Grounding DINO: 8 heads and 4 points per level
BERT_HEAD_DIM = 64


def original_config(sd: StateDict) -> GroundingDinoConfig:
    """The ``GroundingDinoConfig`` of an original-layout state dict (names without ``module.``).

    Raises:
        ValueError: the tensors are not a Grounding DINO in the original layout; the message says
            what was found.
    """
    missing = [name for name in REQUIRED if name not in sd]
    if missing:
        raise ValueError(_not_grounding_dino(sd, missing))
    d_model = sd["transformer.tgt_embed.weight"].shape[1]
    levels = sd["transformer.level_embed"].shape[0]
    encoder_layers = _count(sd, r"transformer\.encoder\.layers\.(\d+)\.self_attn\.sampling_offsets\.weight")
    decoder_layers = _count(sd, r"transformer\.decoder\.layers\.(\d+)\.cross_attn\.sampling_offsets\.weight")
    config = GroundingDinoConfig(
        swin=swin_config(sd),
        text=bert_config(sd),
        d_model=d_model,
        num_feature_levels=levels,
        num_queries=sd["transformer.tgt_embed.weight"].shape[0],
        encoder_layers=encoder_layers,
        encoder_ffn_dim=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        encoder_heads=TRANSFORMER_HEADS,
        encoder_points=_points(sd, "transformer.encoder.layers.0.self_attn", levels),
        decoder_layers=decoder_layers,
        decoder_ffn_dim=sd["transformer.decoder.layers.0.linear1.weight"].shape[0],
        decoder_heads=TRANSFORMER_HEADS,
        decoder_points=_points(sd, "transformer.decoder.layers.0.cross_attn", levels),
    )
    config.check()
    return config


def swin_config(sd: StateDict) -> SwinConfig:
    """Swin's size from the patch embedding, the blocks and their relative-position tables."""
    embed, channels, patch, _ = sd[SWIN + "patch_embed.proj.weight"].shape  # (C, 3, p, p)
    stages = _count(sd, r"backbone\.0\.layers\.(\d+)\.blocks\.0\.norm1\.weight")
    depths = tuple(_count(sd, rf"backbone\.0\.layers\.{i}\.blocks\.(\d+)\.norm1\.weight") for i in range(stages))
    tables = [sd[f"{SWIN}layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    heads = tuple(int(t.shape[1]) for t in tables)  # ((2w - 1)^2, heads)
    window = (math.isqrt(int(tables[0].shape[0])) + 1) // 2
    hidden = sd[SWIN + "layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    outputs = tuple(sorted(int(m.group(1)) for name in sd if (m := re.match(r"backbone\.0\.norm(\d+)\.weight$", name))))
    return SwinConfig(
        embed_dim=int(embed),
        depths=depths,
        num_heads=heads,
        window_size=window,
        mlp_ratio=hidden / embed,
        patch_size=int(patch),
        in_channels=int(channels),
        out_indices=outputs,
    )


def bert_config(sd: StateDict) -> BertConfig:
    """BERT's size from its embeddings and layers (64 channels per head, as BERT-base)."""
    vocab, hidden = sd["bert.embeddings.word_embeddings.weight"].shape
    return BertConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_layers=_count(sd, r"bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight"),
        num_heads=max(1, int(hidden) // BERT_HEAD_DIM),
        intermediate_size=int(sd["bert.encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(sd["bert.embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(sd["bert.embeddings.token_type_embeddings.weight"].shape[0]),
    )


def _points(sd: StateDict, prefix: str, levels: int) -> int:
    """Sampling points per level: ``attention_weights`` has heads x levels x points rows."""
    rows = int(sd[prefix + ".attention_weights.weight"].shape[0])
    if rows % (TRANSFORMER_HEADS * levels):
        raise ValueError(f"{prefix}.attention_weights has {rows} rows, not a multiple of 8 heads x {levels} levels")
    return rows // (TRANSFORMER_HEADS * levels)


def _count(sd: StateDict, pattern: str) -> int:
    """How many distinct indices the one group of ``pattern`` takes over the names (0 if none)."""
    found = {int(m.group(1)) for name in sd if (m := re.fullmatch(pattern, name))}
    if found != set(range(len(found))):
        raise ValueError(f"the checkpoint's layers matching {pattern!r} are not numbered 0..{len(found) - 1}")
    return len(found)


def _not_grounding_dino(sd: StateDict, missing: list[str]) -> str:
    prefixes = sorted({name.split(".")[0] + "." for name in sd})
    family = next((what for prefix, what in OTHER_FAMILIES.items() if any(n.startswith(prefix) for n in sd)), None)
    found = f" (it looks like {family})" if family else ""
    return (
        f"not a Grounding DINO checkpoint{found}: it has no {missing[0]}; its tensors are under "
        f"{', '.join(prefixes[:8])}{' ...' if len(prefixes) > 8 else ''}. gdino loads Grounding DINO, "
        "MM-Grounding-DINO and LLMDet checkpoints (Swin backbones, BERT text encoder)"
    )
