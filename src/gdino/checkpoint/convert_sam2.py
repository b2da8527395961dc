"""Pure key conversion for SAM 2.1: the published layouts <-> ``gdino.models.sam2.model.Sam2``'s names.

Our names are the original repository's (``sam2.1_hiera_*.pt``, the ``"model"`` dict), with which
the weights were trained, so an original file maps 1:1 once the video model's tensors (memory
attention, memory encoder, object pointers, temporal encodings) are set aside: they are listed in
``IGNORED_ORIGINAL`` and returned as ignored, never silently dropped. The Hugging Face layout (names
as transformers' ``Sam2Model`` saves them, and ``Sam2VideoModel``'s, whose extra tensors are in
``IGNORED_HF``) maps through one rule table, both ways. Its MLPs name their first and last layers
``proj_in`` and ``proj_out`` (the original ``layers.0`` and ``layers.{n-1}``), and it stores the
point embeddings as one (4, C) table and the position matrix twice (``shared_image_embedding`` and
``prompt_encoder.shared_embedding``, equal in every published file; copies that differ are refused).

Every function maps a ``{name: tensor}`` dict to another and does no IO. Names no rule places are
returned as unknown for the strict loader to report.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

StateDict = dict[str, torch.Tensor]

# The original video model's tensors (SAM2Base beyond the image path).
IGNORED_ORIGINAL = (
    re.compile(r"^(?:memory_attention|memory_encoder|obj_ptr_proj|obj_ptr_tpos_proj|mask_downsample)\."),
    re.compile(r"^(?:maskmem_tpos_enc|no_mem_pos_enc|no_obj_ptr|no_obj_embed_spatial)$"),
)
# transformers' Sam2VideoModel's extra tensors (the hub's facebook/sam2.1-hiera-* files hold them).
IGNORED_HF = (
    re.compile(
        r"^(?:memory_attention|memory_encoder|object_pointer_proj|temporal_positional_encoding_projection_layer"
        r"|mask_downsample)\."
    ),
    re.compile(
        r"^(?:memory_temporal_positional_encoding|no_memory_positional_encoding|no_object_pointer"
        r"|occlusion_spatial_embedding_parameter)$"
    ),
)

_PE = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_HF_PE = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_HF_POINTS = "prompt_encoder.point_embed.weight"
_POINTS = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d)\.weight$")
# An MLP's layers: transformers' proj_in, layers.{i}, proj_out; the original's layers.{0..n-1}.
_MLP = r"(?P<mlp>.+\.(?:mlp|output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head))"
_HF_MLP = re.compile(_MLP + r"\.(?:(?P<end>proj_in|proj_out)|layers\.(?P<i>\d+))\.(?P<kind>weight|bias)$")
_OUR_MLP = re.compile(_MLP + r"\.layers\.(?P<i>\d+)\.(?P<kind>weight|bias)$")


# Mask-decoder parts named alike in both layouts (the heads' MLP layers are renamed on their own).
_DECODER_PARTS = (
    "iou_token",
    "mask_tokens",
    "obj_score_token",
    "conv_s0",
    "conv_s1",
    "output_hypernetworks_mlps.{0}",
    "iou_prediction_head",
    "pred_obj_score_head",
)


def _rules() -> list[tuple[str, str]]:
    """(Hugging Face prefix, our prefix); "{0}" is a block or layer number, a trailing "$" a whole name,
    and the rest of a name (".weight", ".layers.1.bias") carries over."""
    hb, ob = "vision_encoder.backbone.", "image_encoder.trunk."
    hd, od = "mask_decoder.", "sam_mask_decoder."
    rules = [
        (hb + "patch_embed.projection.", ob + "patch_embed.proj."),
        (hb + "pos_embed$", ob + "pos_embed$"),
        (hb + "pos_embed_window$", ob + "pos_embed_window$"),
        (hb + "blocks.{0}.layer_norm1.", ob + "blocks.{0}.norm1."),
        (hb + "blocks.{0}.layer_norm2.", ob + "blocks.{0}.norm2."),
        *((hb + f"blocks.{{0}}.{m}.", ob + f"blocks.{{0}}.{m}.") for m in ("attn.qkv", "attn.proj", "proj", "mlp")),
        ("vision_encoder.neck.convs.{0}.", "image_encoder.neck.convs.{0}.conv."),
        *((f"prompt_encoder.{m}.", f"sam_prompt_encoder.{m}.") for m in ("not_a_point_embed", "no_mask_embed")),
        *(
            (f"prompt_encoder.mask_embed.{hf}.", f"sam_prompt_encoder.mask_downscaling.{i}.")
            for hf, i in (("conv1", 0), ("layer_norm1", 1), ("conv2", 3), ("layer_norm2", 4), ("conv3", 6))
        ),
        (hd + "transformer.layers.{0}.mlp.", od + "transformer.layers.{0}.mlp."),
        *(
            (f"{hd}transformer.layers.{{0}}.layer_norm{i}.", f"{od}transformer.layers.{{0}}.norm{i}.")
            for i in range(1, 5)
        ),
        (hd + "transformer.layer_norm_final_attn.", od + "transformer.norm_final_attn."),
        (hd + "upscale_conv1.", od + "output_upscaling.0."),
        (hd + "upscale_layer_norm.", od + "output_upscaling.1."),
        (hd + "upscale_conv2.", od + "output_upscaling.3."),
        *((hd + f"{m}.", od + f"{m}.") for m in _DECODER_PARTS),
        ("no_memory_embedding$", "no_mem_embed$"),
    ]
    attentions = ["transformer.final_attn_token_to_image"] + [
        f"transformer.layers.{{0}}.{a}" for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    ]
    for a in attentions:
        rules += [(f"{hd}{a}.{p}_proj.", f"{od}{a}.{p}_proj.") for p in "qkv"]
        rules.append((f"{hd}{a}.o_proj.", f"{od}{a}.out_proj."))
    return rules


def _compile(template: str) -> re.Pattern[str]:
    body = re.escape(template.rstrip("$")).replace(r"\{0\}", r"(?P<n>\d+)")
    return re.compile("^" + body + ("$" if template.endswith("$") else ""))


def _fill(template: str, m: re.Match[str]) -> str:
    return template.rstrip("$").replace("{0}", m.groupdict().get("n") or "")


_FORWARD = [(_compile(hf), ours) for hf, ours in _rules()]
_BACKWARD = [(_compile(ours), hf) for hf, ours in _rules()]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if m := pattern.match(name):
            return _fill(template, m) + name[m.end() :]
    return None


class Converted(NamedTuple):
    """A conversion's result: the tensors under our names, the file's names no rule places (for the
    strict loader to report) and the names knowingly set aside (the video model's)."""

    tensors: StateDict
    unknown: list[str]
    ignored: list[str]


def _mlp_layers_hf(names: list[str]) -> dict[str, str]:
    """Hugging Face MLP layer names -> the original's: proj_in -> layers.0, layers.i -> layers.{i+1},
    proj_out -> layers.{n-1} (n counted from each MLP's names)."""
    hidden: dict[str, int] = {}
    found = [(name, m) for name in names if (m := _HF_MLP.match(name))]
    for _, m in found:
        hidden.setdefault(m["mlp"], 0)
        if m["i"] is not None:
            hidden[m["mlp"]] = max(hidden[m["mlp"]], int(m["i"]) + 1)
    out = {}
    for name, m in found:
        index = 0 if m["end"] == "proj_in" else hidden[m["mlp"]] + 1 if m["end"] == "proj_out" else int(m["i"]) + 1
        out[name] = f"{m['mlp']}.layers.{index}.{m['kind']}"
    return out


def hf_to_ours(sd: StateDict) -> Converted:
    """transformers' ``Sam2Model`` (or ``Sam2VideoModel``) names -> ours."""
    out: StateDict = {}
    unknown: list[str] = []
    ignored = [n for n in sd if any(p.match(n) for p in IGNORED_HF)]
    mlp_names = _mlp_layers_hf([n for n in sd if n not in ignored])
    for name, t in sd.items():
        if name in ignored or name in _HF_PE:
            continue
        if name == _HF_POINTS:
            out.update({f"sam_prompt_encoder.point_embeddings.{i}.weight": row[None] for i, row in enumerate(t)})
            continue
        new = _rename(mlp_names.get(name, name), _FORWARD)
        if new is None:
            unknown.append(name)
        else:
            out[new] = t
    pe = [(n, sd[n]) for n in _HF_PE if n in sd]
    if pe:
        first_name, first = pe[0]
        for n, t in pe[1:]:
            if t.shape != first.shape or not torch.equal(t, first):
                unknown.append(f"{n} (differs from {first_name}: the model has one position matrix)")
        out[_PE] = first
    return Converted(out, unknown, ignored)


def ours_to_hf(sd: StateDict) -> StateDict:
    """Ours -> the names transformers' ``Sam2Model`` saves; the inverse of ``hf_to_ours``.

    Raises:
        ValueError: a name with no Hugging Face counterpart.
    """
    layers: dict[str, int] = {}
    for name in sd:
        if m := _OUR_MLP.match(name):
            layers[m["mlp"]] = max(layers.get(m["mlp"], 0), int(m["i"]) + 1)
    out: StateDict = {}
    points: dict[int, torch.Tensor] = {}
    for name, t in sd.items():
        if name == _PE:
            out.update(dict.fromkeys(_HF_PE, t))
            continue
        if m := _POINTS.match(name):
            points[int(m[1])] = t
            continue
        if m := _OUR_MLP.match(name):
            i, last = int(m["i"]), layers[m["mlp"]] - 1
            part = "proj_in" if i == 0 else "proj_out" if i == last else f"layers.{i - 1}"
            name = f"{m['mlp']}.{part}.{m['kind']}"
        new = _rename(name, _BACKWARD)
        if new is None:
            raise ValueError(f"no Hugging Face name for {name}")
        out[new] = t
    if points:
        out[_HF_POINTS] = torch.cat([points[i] for i in sorted(points)])  # (4, C)
    return out


def original_to_ours(sd: StateDict) -> Converted:
    """The original ``sam2.1_hiera_*.pt``'s ``"model"`` dict -> ours: the same names, the video
    model's set aside (``IGNORED_ORIGINAL``); nothing is unknown here (the strict loader reports
    any name the model lacks)."""
    out: StateDict = {}
    ignored: list[str] = []
    for name, t in sd.items():
        name = name.removeprefix("module.")  # files saved from DistributedDataParallel
        if any(p.match(name) for p in IGNORED_ORIGINAL):
            ignored.append(name)
        else:
            out[name] = t
    return Converted(out, [], ignored)


def ours_to_original(sd: StateDict) -> StateDict:
    """Ours -> the original's names (the identity: the original file adds the video model's tensors)."""
    return dict(sd)


def layout(sd: StateDict) -> str | None:
    """ "hf" or "original" by the trunk's names (Hiera's: SAM's ViT has ``vision_encoder.layers`` or
    ``image_encoder.blocks`` instead), or None for neither (another model's file)."""
    if any(n.startswith("vision_encoder.backbone.") for n in sd):
        return "hf"
    if any(n.removeprefix("module.").startswith("image_encoder.trunk.") for n in sd):
        return "original"
    return None
