"""Pure key conversion between the published checkpoint layouts and ours.

Our parameter names follow the original repository (``groundingdino_swint_ogc.pth``) with two
simplifications: the Swin backbone is ``backbone.`` (not ``backbone.0.``), and the box head shared
by all decoder layers is stored once as ``bbox_embed.`` (the original file holds it twelve times,
a Hugging Face file once or more under several names). Heads that are not shared (a config's
``decoder_bbox_embed_share`` / ``decoder_cls_embed_share`` false, MM-Grounding-DINO) are
``bbox_embed.{layer}.`` and ``class_embed.{layer}.``; MM-Grounding-DINO's class heads hold a bias
(``class_embed.bias`` when shared, and ``transformer.enc_out_class_embed.bias``), Grounding DINO's
none.

Every function maps a ``{name: tensor}`` dict to another and does no IO, so each direction can be
tested alone. Tensors that can be recomputed (Swin's ``relative_position_index``, BERT's
``position_ids``) and tensors the detector never uses (BERT's pooler, the HF Swin's final norm) are
dropped knowingly; every other name must map, or it is returned as unknown for the strict loader
to report.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

# Names present in published files that the detector never uses or recomputes.
IGNORED_ORIGINAL = (
    re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$"),
    re.compile(r"^bert\.embeddings\.position_ids$"),
    re.compile(r"^bert\.pooler\."),
)
IGNORED_HF = (
    re.compile(r".*\.relative_position_index$"),
    re.compile(r"^model\.text_backbone\.embeddings\.position_ids$"),
    re.compile(r"^model\.text_backbone\.pooler\."),
    re.compile(r"^model\.backbone\.conv_encoder\.model\.swin\.layernorm\."),
)

_SWIN = "model.backbone.conv_encoder.model."
_ENC = "model.encoder.layers.{0}."
_DEC = "model.decoder.layers.{0}."
_BLOCK = _SWIN + "encoder.layers.{0}.blocks.{1}."

# (Hugging Face name prefix, our name prefix). "{n}" stands for a layer number; the rest of the
# name (".weight", ".bias", ".layers.0.weight", ...) carries over unchanged. A prefix ending in "$"
# is a whole name.
_RULES: list[tuple[str, str]] = [
    # Swin backbone
    (_SWIN + "embeddings.patch_embeddings.projection.", "backbone.patch_embed.proj."),
    (_SWIN + "embeddings.norm.", "backbone.patch_embed.norm."),
    (_BLOCK + "layernorm_before.", "backbone.layers.{0}.blocks.{1}.norm1."),
    (_BLOCK + "layernorm_after.", "backbone.layers.{0}.blocks.{1}.norm2."),
    (
        _BLOCK + "attention.self.relative_position_bias_table$",
        "backbone.layers.{0}.blocks.{1}.attn.relative_position_bias_table$",
    ),
    (_BLOCK + "attention.output.dense.", "backbone.layers.{0}.blocks.{1}.attn.proj."),
    (_BLOCK + "intermediate.dense.", "backbone.layers.{0}.blocks.{1}.mlp.fc1."),
    (_BLOCK + "output.dense.", "backbone.layers.{0}.blocks.{1}.mlp.fc2."),
    (_SWIN + "encoder.layers.{0}.downsample.", "backbone.layers.{0}.downsample."),
    # HF names the output norms after the stage (stem = stage 0); the original after the 0-based index.
    (_SWIN + "hidden_states_norms.stage1.", "backbone.norm0."),  # five-level models (Swin-L) use stage 1 too
    (_SWIN + "hidden_states_norms.stage2.", "backbone.norm1."),
    (_SWIN + "hidden_states_norms.stage3.", "backbone.norm2."),
    (_SWIN + "hidden_states_norms.stage4.", "backbone.norm3."),
    # BERT and its projection, image input projections
    ("model.text_backbone.", "bert."),
    ("model.text_projection.", "feat_map."),
    ("model.input_proj_vision.", "input_proj."),
    # Two-stage proposal head and queries
    ("model.level_embed$", "transformer.level_embed$"),
    ("model.query_position_embeddings.", "transformer.tgt_embed."),
    ("model.enc_output.", "transformer.enc_output."),
    ("model.enc_output_norm.", "transformer.enc_output_norm."),
    ("model.encoder_output_bbox_embed.", "transformer.enc_out_bbox_embed."),
    ("model.encoder_output_class_embed.", "transformer.enc_out_class_embed."),
    # Feature enhancer: text self-attention, image-text fusion, deformable self-attention
    (_ENC + "text_enhancer_layer.self_attn.out_proj.", "transformer.encoder.text_layers.{0}.self_attn.out_proj."),
    (_ENC + "text_enhancer_layer.fc1.", "transformer.encoder.text_layers.{0}.linear1."),
    (_ENC + "text_enhancer_layer.fc2.", "transformer.encoder.text_layers.{0}.linear2."),
    (_ENC + "text_enhancer_layer.layer_norm_before.", "transformer.encoder.text_layers.{0}.norm1."),
    (_ENC + "text_enhancer_layer.layer_norm_after.", "transformer.encoder.text_layers.{0}.norm2."),
    (_ENC + "fusion_layer.vision_param$", "transformer.encoder.fusion_layers.{0}.gamma_v$"),
    (_ENC + "fusion_layer.text_param$", "transformer.encoder.fusion_layers.{0}.gamma_l$"),
    (_ENC + "fusion_layer.layer_norm_vision.", "transformer.encoder.fusion_layers.{0}.layer_norm_v."),
    (_ENC + "fusion_layer.layer_norm_text.", "transformer.encoder.fusion_layers.{0}.layer_norm_l."),
    (_ENC + "fusion_layer.attn.vision_proj.", "transformer.encoder.fusion_layers.{0}.attn.v_proj."),
    (_ENC + "fusion_layer.attn.text_proj.", "transformer.encoder.fusion_layers.{0}.attn.l_proj."),
    (_ENC + "fusion_layer.attn.values_vision_proj.", "transformer.encoder.fusion_layers.{0}.attn.values_v_proj."),
    (_ENC + "fusion_layer.attn.values_text_proj.", "transformer.encoder.fusion_layers.{0}.attn.values_l_proj."),
    (_ENC + "fusion_layer.attn.out_vision_proj.", "transformer.encoder.fusion_layers.{0}.attn.out_v_proj."),
    (_ENC + "fusion_layer.attn.out_text_proj.", "transformer.encoder.fusion_layers.{0}.attn.out_l_proj."),
    (_ENC + "deformable_layer.self_attn.", "transformer.encoder.layers.{0}.self_attn."),
    (_ENC + "deformable_layer.self_attn_layer_norm.", "transformer.encoder.layers.{0}.norm1."),
    (_ENC + "deformable_layer.fc1.", "transformer.encoder.layers.{0}.linear1."),
    (_ENC + "deformable_layer.fc2.", "transformer.encoder.layers.{0}.linear2."),
    (_ENC + "deformable_layer.final_layer_norm.", "transformer.encoder.layers.{0}.norm2."),
    # Decoder
    (_DEC + "self_attn.out_proj.", "transformer.decoder.layers.{0}.self_attn.out_proj."),
    (_DEC + "self_attn_layer_norm.", "transformer.decoder.layers.{0}.norm2."),
    (_DEC + "encoder_attn_text.out_proj.", "transformer.decoder.layers.{0}.ca_text.out_proj."),
    (_DEC + "encoder_attn_text_layer_norm.", "transformer.decoder.layers.{0}.catext_norm."),
    (_DEC + "encoder_attn.", "transformer.decoder.layers.{0}.cross_attn."),
    (_DEC + "encoder_attn_layer_norm.", "transformer.decoder.layers.{0}.norm1."),
    (_DEC + "fc1.", "transformer.decoder.layers.{0}.linear1."),
    (_DEC + "fc2.", "transformer.decoder.layers.{0}.linear2."),
    (_DEC + "final_layer_norm.", "transformer.decoder.layers.{0}.norm3."),
    ("model.decoder.layer_norm.", "transformer.decoder.norm."),
    ("model.decoder.reference_points_head.", "transformer.decoder.ref_point_head."),
]

# transformers 5 keeps Swin under other names in memory (files are still saved with the names
# above); these read-only aliases let a live transformers model's state_dict load too.
_BLOCK5 = _SWIN + "swin.encoder.layers.{0}.blocks.{1}."
_ALIASES: list[tuple[str, str]] = [
    (_SWIN + "swin.embeddings.patch_embeddings.projection.", "backbone.patch_embed.proj."),
    (_SWIN + "swin.embeddings.norm.", "backbone.patch_embed.norm."),
    (_BLOCK5 + "layernorm_before.", "backbone.layers.{0}.blocks.{1}.norm1."),
    (_BLOCK5 + "layernorm_after.", "backbone.layers.{0}.blocks.{1}.norm2."),
    (
        _BLOCK5 + "attention.relative_position_bias.relative_position_bias_table$",
        "backbone.layers.{0}.blocks.{1}.attn.relative_position_bias_table$",
    ),
    (_BLOCK5 + "attention.o_proj.", "backbone.layers.{0}.blocks.{1}.attn.proj."),
    (_BLOCK5 + "mlp.", "backbone.layers.{0}.blocks.{1}.mlp."),
    (_SWIN + "swin.encoder.layers.{0}.downsample.", "backbone.layers.{0}.downsample."),
]

# Attention blocks stored as separate query/key/value in HF and packed [q; k; v] in ours:
# (HF prefix, HF names of q, k, v, our prefix, our packed weight name, our packed bias name).
_QKV = ("query", "key", "value")
_PACKED: list[tuple[str, tuple[str, str, str], str, str, str]] = [
    (_BLOCK + "attention.self.", _QKV, "backbone.layers.{0}.blocks.{1}.attn.", "qkv.weight", "qkv.bias"),
    (
        _ENC + "text_enhancer_layer.self_attn.",
        _QKV,
        "transformer.encoder.text_layers.{0}.self_attn.",
        "in_proj_weight",
        "in_proj_bias",
    ),
    (_DEC + "self_attn.", _QKV, "transformer.decoder.layers.{0}.self_attn.", "in_proj_weight", "in_proj_bias"),
    (_DEC + "encoder_attn_text.", _QKV, "transformer.decoder.layers.{0}.ca_text.", "in_proj_weight", "in_proj_bias"),
]
_PACKED_ALIASES = [
    (
        _BLOCK5 + "attention.",
        ("q_proj", "k_proj", "v_proj"),
        "backbone.layers.{0}.blocks.{1}.attn.",
        "qkv.weight",
        "qkv.bias",
    ),
]


# A decoder layer's box or class head, under its own name or the decoder's copy of it.
_HF_HEAD = re.compile(r"^(?:model\.decoder\.)?(?P<head>bbox_embed|class_embed)\.(?P<layer>\d+)\.(?P<rest>.+)$")
_ORIGINAL_HEAD = re.compile(
    r"^(?:transformer\.decoder\.)?(?P<head>bbox_embed|class_embed)\.(?P<layer>\d+)\.(?P<rest>.+)$"
)
_OUR_HEAD = re.compile(r"^(?P<head>bbox_embed|class_embed)\.(?:(?P<layer>\d+)\.)?(?P<rest>.+)$")
Copies = dict[tuple[str, int, str], list[tuple[str, torch.Tensor]]]  # (head, layer, rest) -> [(file name, tensor)]


class ConversionError(ValueError):
    """The file's tensors cannot be mapped onto the model; the message names them."""


def _compile(template: str, suffix: str = "") -> re.Pattern[str]:
    """``a.{0}.b.`` -> a regex matching names starting so; a trailing ``$`` means the whole name."""
    exact = template.endswith("$")
    body = re.escape(template.rstrip("$"))
    body = re.sub(r"\\\{(\d)\\\}", r"(?P<n\1>\\d+)", body)
    return re.compile("^" + body + suffix + ("$" if exact else ""))


def _fill(template: str, m: re.Match[str]) -> str:
    numbers = m.groupdict()
    return re.sub(r"\{(\d)\}", lambda g: numbers["n" + g.group(1)], template.rstrip("$"))


_FORWARD = [(_compile(hf), ours) for hf, ours in _RULES + _ALIASES]
_BACKWARD = [(_compile(ours), hf) for hf, ours in _RULES]
_PACKED_FORWARD = [
    (_compile(hf, f"(?P<part>{'|'.join(parts)})\\.(?P<kind>weight|bias)$"), parts, ours, w, b)
    for hf, parts, ours, w, b in _PACKED + _PACKED_ALIASES
]
_PACKED_BACKWARD = [
    (_compile(ours, f"(?P<kind>{re.escape(w)}|{re.escape(b)})$"), hf, parts, w) for hf, parts, ours, w, b in _PACKED
]


def _ignored(name: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    return any(p.match(name) for p in patterns)


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return _fill(template, m) + name[m.end() :]
    return None


def merge_heads(copies: Copies, shared_boxes: bool = True, shared_classes: bool = True) -> StateDict:
    """The decoder layers' heads, one name per tensor: a shared head once (``bbox_embed.rest``), else
    one per layer (``bbox_embed.{layer}.rest``); every stored copy of one tensor must hold the same values."""
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for (head, layer, rest), found in copies.items():
        shared = shared_boxes if head == "bbox_embed" else shared_classes
        groups.setdefault(f"{head}.{rest}" if shared else f"{head}.{layer}.{rest}", []).extend(found)
    out: StateDict = {}
    differing = []
    for ours, found in groups.items():
        first_name, first = found[0]
        differing += [
            f"{n} != {first_name}" for n, t in found[1:] if t.shape != first.shape or not torch.equal(t, first)
        ]
        out[ours] = first
    if differing:
        raise ConversionError(
            "the config shares the decoder's heads by all layers (decoder_bbox_embed_share, decoder_cls_embed_share), "
            "but these copies differ: " + ", ".join(differing[:8])
        )
    return out


def hf_to_ours(sd: StateDict, shared_boxes: bool = True, shared_classes: bool = True) -> tuple[StateDict, list[str]]:
    """Hugging Face ``GroundingDinoForObjectDetection`` (and ``MMGroundingDinoForObjectDetection``) names -> ours.

    ``shared_boxes`` and ``shared_classes`` are the config's ``decoder_bbox_embed_share`` and
    ``decoder_cls_embed_share``. Returns the converted dict and the names no rule maps (the strict
    loader reports them).
    """
    out: StateDict = {}
    unknown: list[str] = []
    packed: dict[str, dict[str, torch.Tensor]] = {}
    heads: Copies = {}
    for name, t in sd.items():
        if _ignored(name, IGNORED_HF):
            continue
        if m := _HF_HEAD.match(name):
            heads.setdefault((m["head"], int(m["layer"]), m["rest"]), []).append((name, t))
            continue
        for pattern, parts, ours, w_name, b_name in _PACKED_FORWARD:
            if m := pattern.match(name):
                target = _fill(ours, m) + (w_name if m["kind"] == "weight" else b_name)
                packed.setdefault(target, {})[_QKV[parts.index(m["part"])]] = t
                break
        else:
            new = _rename(name, _FORWARD)
            if new is None:
                unknown.append(name)
            else:
                out[new] = t
    for target, found in packed.items():
        if len(found) != 3:
            unknown.append(f"{target} (has only {', '.join(sorted(found))} of query, key, value)")
            continue
        out[target] = torch.cat([found["query"], found["key"], found["value"]], 0)  # (3 * dim, ...)
    out.update(merge_heads(heads, shared_boxes, shared_classes))
    return out, unknown


def ours_to_hf(sd: StateDict) -> StateDict:
    """Ours -> Hugging Face names as ``save_pretrained`` writes them; the inverse of ``hf_to_ours``."""
    out: StateDict = {}
    for name, t in sd.items():
        if m := _OUR_HEAD.match(name):  # a shared head is saved as layer 0's; transformers ties the others
            out[f"{m['head']}.{m['layer'] or 0}.{m['rest']}"] = t
            continue
        for pattern, hf, parts, w_name in _PACKED_BACKWARD:
            if m := pattern.match(name):
                kind = "weight" if m["kind"] == w_name else "bias"
                for part, chunk in zip(parts, t.chunk(3, 0)):
                    out[f"{_fill(hf, m)}{part}.{kind}"] = chunk.contiguous()
                break
        else:
            new = _rename(name, _BACKWARD)
            if new is None:
                raise ConversionError(f"no Hugging Face name for {name}")
            out[new] = t
    return out


def original_to_ours(
    sd: StateDict, shared_boxes: bool = True, shared_classes: bool = True
) -> tuple[StateDict, list[str]]:
    """Original repository names (the ``'model'`` dict of groundingdino_swint_ogc.pth) -> ours.

    Returns the converted dict and the names it cannot place (none today: every other name is
    already ours, and the strict loader reports any that the model lacks).
    """
    out: StateDict = {}
    heads: Copies = {}
    for name, t in sd.items():
        name = name.removeprefix("module.")  # files saved from DistributedDataParallel
        if _ignored(name, IGNORED_ORIGINAL):
            continue
        if m := _ORIGINAL_HEAD.match(name):
            heads.setdefault((m["head"], int(m["layer"]), m["rest"]), []).append((name, t))
        elif name.startswith("backbone.0."):
            out["backbone." + name.removeprefix("backbone.0.")] = t
        else:
            out[name] = t
    out.update(merge_heads(heads, shared_boxes, shared_classes))
    return out, []


def ours_to_original(sd: StateDict, decoder_layers: int) -> StateDict:
    """Ours -> original repository names, with every shared box-head copy that repository stores."""
    out: StateDict = {}
    for name, t in sd.items():
        if m := _OUR_HEAD.match(name):
            for i in range(decoder_layers) if m["layer"] is None else [int(m["layer"])]:
                out[f"{m['head']}.{i}.{m['rest']}"] = t
                out[f"transformer.decoder.{m['head']}.{i}.{m['rest']}"] = t
        elif name.startswith("backbone."):
            out["backbone.0." + name.removeprefix("backbone.")] = t
        else:
            out[name] = t
    return out
