"""OpenMMLab's mmdetection checkpoints (MM-Grounding-DINO, LLMDet) <-> our names, and their architecture.

An mmdetection ``.pth`` is ``{"meta": ..., "state_dict": {name: tensor}}`` (some files say
``"model"``) with no ``config.json``: ``mmdet_state_dict`` takes the tensors out of it,
``looks_mmdet`` tells the layout from its names, ``mmdet_to_ours`` renames them to ours (the
original repository's, see ``gdino.checkpoint.convert``), ``ours_to_mmdet`` is the inverse, and
``mmdet_config`` reads the architecture off the tensors' names and shapes.

The quirks of the layout, and what is done about each:

* Swin blocks are ``backbone.stages.{i}.blocks.{j}``, their attention ``attn.w_msa.``, their MLP
  ``ffn.layers.0.0`` and ``ffn.layers.1`` (``mlp.fc1``, ``mlp.fc2``). The attention's ``qkv`` is
  packed ``[q; k; v]`` as ours, so it is only renamed (transformers splits it for its layout).
* Swin's patch merging: mmdetection gathers each 2x2 neighbourhood with ``nn.Unfold``, whose
  channels run ``(C, row, col)`` (channel ``4 c + 2 row + col``); ours (the original Swin)
  concatenates the neighbours ``(0, 0), (1, 0), (0, 1), (1, 1)`` whole (channel ``k C + c``). The
  downsample's norm (4C,) and the reduction's input columns (2C, 4C) are permuted between the two.
* The Swin output norms are ``backbone.norm{i}`` with ``i`` the 0-based stage, as ours: no index
  shift here (transformers' script shifts them by one for its ``hidden_states_norms.stage{i+1}``).
* The neck (mmdetection's ``ChannelMapper``) keeps the 1x1 convolutions of the Swin outputs in
  ``neck.convs.{i}`` and the extra stride-2 level in ``neck.extra_convs.{j}``, each a ``conv`` and a
  ``gn``; ours is one list, ``input_proj.{i}.0`` / ``.1``, the extra levels after the convs.
* mmcv's attention wraps ``nn.MultiheadAttention`` as ``.attn``: the text layers' and the
  decoder's ``self_attn.attn.in_proj_weight`` (packed ``[q; k; v]`` in both) is our
  ``self_attn.in_proj_weight``, the decoder's ``cross_attn_text.attn.`` our ``ca_text.``.
* Layer norms are numbered in the order a layer applies them, ``norms.{k}``: encoder and text
  layers 0 (after attention) and 1 (after the FFN) are ``norm1``, ``norm2``; decoder 0 (self
  attention) ``norm2``, 1 (text cross-attention) ``catext_norm``, 2 (image cross-attention)
  ``norm1``, 3 (FFN) ``norm3``, as the original repository names them. FFNs are
  ``ffn.layers.0.0`` and ``ffn.layers.1`` (``linear1``, ``linear2``).
* The heads are ``bbox_head.cls_branches.{n}`` and ``bbox_head.reg_branches.{n}`` for ``n`` in
  ``0..decoder_layers``: one per decoder layer, and the last (``n == decoder_layers``) is the
  encoder's two-stage proposal head (``transformer.enc_out_class_embed``,
  ``transformer.enc_out_bbox_embed``). A regression branch is ``Linear, ReLU, Linear, ReLU,
  Linear``, so its weights sit at 0, 2, 4 (our ``layers.0``, ``.1``, ``.2``). mmdetection writes
  every branch even when one module is shared by all layers: whether the decoder's heads are shared
  is read from their values (all equal: shared).
* The class head (``ContrastiveEmbed``) holds a bias of shape (1,); ours is a scalar ().
  mmdetection's port of the original Grounding DINO has no class bias at all: its
  ``model_type`` is "grounding-dino"; a class head with a learnt ``log_scale`` is refused.
* The rest: ``language_model.language_backbone.body.model.`` is ``bert.``, ``text_feat_map`` is
  ``feat_map``, ``query_embedding`` is ``transformer.tgt_embed``, ``memory_trans_fc`` and
  ``memory_trans_norm`` are ``transformer.enc_output`` and ``transformer.enc_output_norm``,
  ``level_embed`` is ``transformer.level_embed``; the fusion layers keep their names under
  ``transformer.encoder.``.
* Dropped knowingly: the recomputed buffers (Swin's ``relative_position_index``: mmdetection
  builds it from a flipped sequence, with the same values as ours; BERT's ``position_ids``), BERT's
  unused pooler, the training-only denoising label embedding (``dn_query_generator.``) and LLMDet's
  training-only captioning language model and its connectors (``lmm.``, ``connector.``,
  ``region_connector.``, ``ref_point_head.``, ``image_seperate.``). Every other name maps or is
  returned as unknown for the strict loader to report.

What the shapes cannot tell is the published value every mmdetection Grounding DINO uses: 8
attention heads in the transformer (4 in the text layers and the fusion, ``encoder_heads / 2``),
64 channels per BERT head, 256 text tokens; the sampling points follow from the heads and levels.
Boxes are refined with transformers' arithmetic (the default ``box_logit_*``), which its
conversion of these files was checked with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from gdino.checkpoint.architecture import BERT_HEAD_DIM, TRANSFORMER_HEADS
from gdino.checkpoint.convert import ConversionError, Copies, StateDict, merge_heads
from gdino.models.grounding_dino.config import (
    GROUNDING_DINO,
    MM_GROUNDING_DINO,
    BertConfig,
    GroundingDinoConfig,
    SwinConfig,
)

_BERT = "language_model.language_backbone.body.model."
_MM_BLOCK = "backbone.stages.{i}.blocks.{j}."
_OUR_BLOCK = "backbone.layers.{i}.blocks.{j}."
_MM_ENC = "encoder.layers.{i}."
_OUR_ENC = "transformer.encoder.layers.{i}."
_MM_TEXT = "encoder.text_layers.{i}."
_OUR_TEXT = "transformer.encoder.text_layers.{i}."
_MM_DEC = "decoder.layers.{i}."
_OUR_DEC = "transformer.decoder.layers.{i}."

# (mmdetection name prefix, our name prefix). "{i}", "{j}" stand for layer numbers; the rest of the
# name carries over unchanged. A prefix ending in "$" is a whole name. The neck and the heads,
# whose numbers change, are mapped by their own functions.
_RULES: list[tuple[str, str]] = [
    # Swin
    ("backbone.patch_embed.projection.", "backbone.patch_embed.proj."),
    ("backbone.patch_embed.norm.", "backbone.patch_embed.norm."),
    (_MM_BLOCK + "norm1.", _OUR_BLOCK + "norm1."),
    (_MM_BLOCK + "norm2.", _OUR_BLOCK + "norm2."),
    (_MM_BLOCK + "attn.w_msa.qkv.", _OUR_BLOCK + "attn.qkv."),
    (_MM_BLOCK + "attn.w_msa.proj.", _OUR_BLOCK + "attn.proj."),
    (
        _MM_BLOCK + "attn.w_msa.relative_position_bias_table$",
        _OUR_BLOCK + "attn.relative_position_bias_table$",
    ),
    (_MM_BLOCK + "ffn.layers.0.0.", _OUR_BLOCK + "mlp.fc1."),
    (_MM_BLOCK + "ffn.layers.1.", _OUR_BLOCK + "mlp.fc2."),
    ("backbone.stages.{i}.downsample.", "backbone.layers.{i}.downsample."),  # channels reordered, see below
    ("backbone.norm{i}.", "backbone.norm{i}."),  # the 0-based stage in both: no shift
    # BERT and its projection
    (_BERT, "bert."),
    ("text_feat_map.", "feat_map."),
    # Feature enhancer: deformable self-attention, text self-attention, image-text fusion
    (_MM_ENC + "self_attn.", _OUR_ENC + "self_attn."),
    (_MM_ENC + "norms.0.", _OUR_ENC + "norm1."),
    (_MM_ENC + "ffn.layers.0.0.", _OUR_ENC + "linear1."),
    (_MM_ENC + "ffn.layers.1.", _OUR_ENC + "linear2."),
    (_MM_ENC + "norms.1.", _OUR_ENC + "norm2."),
    (_MM_TEXT + "self_attn.attn.", _OUR_TEXT + "self_attn."),
    (_MM_TEXT + "norms.0.", _OUR_TEXT + "norm1."),
    (_MM_TEXT + "ffn.layers.0.0.", _OUR_TEXT + "linear1."),
    (_MM_TEXT + "ffn.layers.1.", _OUR_TEXT + "linear2."),
    (_MM_TEXT + "norms.1.", _OUR_TEXT + "norm2."),
    ("encoder.fusion_layers.", "transformer.encoder.fusion_layers."),
    # Decoder
    (_MM_DEC + "self_attn.attn.", _OUR_DEC + "self_attn."),
    (_MM_DEC + "norms.0.", _OUR_DEC + "norm2."),
    (_MM_DEC + "cross_attn_text.attn.", _OUR_DEC + "ca_text."),
    (_MM_DEC + "norms.1.", _OUR_DEC + "catext_norm."),
    (_MM_DEC + "cross_attn.", _OUR_DEC + "cross_attn."),
    (_MM_DEC + "norms.2.", _OUR_DEC + "norm1."),
    (_MM_DEC + "ffn.layers.0.0.", _OUR_DEC + "linear1."),
    (_MM_DEC + "ffn.layers.1.", _OUR_DEC + "linear2."),
    (_MM_DEC + "norms.3.", _OUR_DEC + "norm3."),
    ("decoder.norm.", "transformer.decoder.norm."),
    ("decoder.ref_point_head.", "transformer.decoder.ref_point_head."),
    # Queries and the two-stage proposals
    ("level_embed$", "transformer.level_embed$"),
    ("query_embedding.", "transformer.tgt_embed."),
    ("memory_trans_fc.", "transformer.enc_output."),
    ("memory_trans_norm.", "transformer.enc_output_norm."),
]

# Names in published mmdetection files that the detector recomputes or never uses.
IGNORED_MMDET = (
    re.compile(r"^backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.relative_position_index$"),
    re.compile("^" + re.escape(_BERT) + r"embeddings\.position_ids$"),
    re.compile("^" + re.escape(_BERT) + r"pooler\."),
    re.compile(r"^dn_query_generator\."),  # training: the denoising queries' label embedding
    re.compile(r"^(lmm|connector|region_connector|ref_point_head|image_seperate)\."),  # LLMDet's training LLM
)

# Names only mmdetection's layout has (neither ours, the original's nor Hugging Face's).
_MMDET_MARKERS = ("backbone.stages.", "neck.", "bbox_head.", "language_model.", "query_embedding.", "memory_trans_")
# What a Grounding DINO in mmdetection's layout must hold.
REQUIRED = (
    "backbone.patch_embed.projection.weight",
    _BERT + "embeddings.word_embeddings.weight",
    "query_embedding.weight",
    "level_embed",
    "encoder.layers.0.self_attn.attention_weights.weight",
    "encoder.text_layers.0.ffn.layers.0.0.weight",
    "encoder.fusion_layers.0.attn.v_proj.weight",
    "decoder.layers.0.cross_attn.attention_weights.weight",
    "bbox_head.reg_branches.0.0.weight",
)
# Other layouts' and families' tell-tale prefixes, for the message.
OTHER_LAYOUTS = {
    "image_encoder.": "a Segment Anything (SAM) checkpoint",
    "sam_mask_decoder.": "a SAM 2 checkpoint",
    "backbone.0.": "a Grounding DINO in the original repository's layout",
    "model.backbone.": "a Hugging Face checkpoint",
    "roi_head.": "an mmdetection two-stage detector (not Grounding DINO)",
    "backbone.layer1.": "an mmdetection model with a ResNet backbone",
}
_FILE_KEYS = ("state_dict", "model")

_NUMBER = re.compile(r"\\\{(\w)\\\}")  # an escaped "{i}" in a template
_MM_HEAD = re.compile(r"^bbox_head\.(?P<kind>cls|reg)_branches\.(?P<n>\d+)\.(?P<rest>.+)$")
_MM_NECK = re.compile(r"^neck\.(?P<list>convs|extra_convs)\.(?P<n>\d+)\.(?P<part>conv|gn)\.(?P<rest>.+)$")
_OUR_HEAD = re.compile(r"^(?P<head>bbox_embed|class_embed)\.(?:(?P<layer>\d+)\.)?(?P<rest>.+)$")
_OUR_ENC_HEAD = re.compile(r"^transformer\.enc_out_(?P<head>bbox_embed|class_embed)\.(?P<rest>.+)$")
_OUR_NECK = re.compile(r"^input_proj\.(?P<n>\d+)\.(?P<part>[01])\.(?P<rest>.+)$")
_OUR_DOWNSAMPLE = re.compile(r"^backbone\.layers\.\d+\.downsample\.(reduction\.weight|norm\.(weight|bias))$")
_REG_LAYER = re.compile(r"^(?P<index>\d+)\.(?P<kind>weight|bias)$")  # a regression branch's Sequential index
_BOX_LAYER = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")  # our MLP's layer
# The 2x2 neighbours run row-major in Unfold, (0, 0), (0, 1), (1, 0), (1, 1), column-major in ours: swap the middle two.
_UNFOLD_ORDER = [0, 2, 1, 3]


def _pattern(template: str) -> re.Pattern[str]:
    """``a.{i}.b.`` -> a regex matching names that start so; a trailing ``$`` means the whole name."""
    body = _NUMBER.sub(lambda m: f"(?P<{m[1]}>\\d+)", re.escape(template.removesuffix("$")))
    return re.compile("^" + body + ("$" if template.endswith("$") else ""))


def _fill(template: str, m: re.Match[str]) -> str:
    return template.removesuffix("$").format(**m.groupdict())


_FORWARD = [(_pattern(mm), ours) for mm, ours in _RULES]
_BACKWARD = [(_pattern(ours), mm) for mm, ours in _RULES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if m := pattern.match(name):
            return _fill(template, m) + name[m.end() :]
    return None


def _unwrapped(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The names without DistributedDataParallel's ``module.``."""
    return {name.removeprefix("module."): t for name, t in sd.items()}


def _indices(sd: Mapping[str, torch.Tensor], pattern: str) -> set[int]:
    """The numbers the one group of ``pattern`` takes over the names."""
    return {int(m[1]) for name in sd if (m := re.match(pattern, name))}


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many layers ``pattern`` numbers (0 if none); they must be numbered 0..n-1."""
    found = _indices(sd, pattern)
    if found != set(range(len(found))):
        raise ValueError(f"the checkpoint's layers matching {pattern!r} are not numbered 0..{len(found) - 1}")
    return len(found)


# --- tensors that change, not only their names ---


def unfold_to_concat(t: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels in mmdetection's ``nn.Unfold`` order -> ours, on the last dim (..., 4C).

    Unfold's channel ``4 c + 2 row + col`` becomes our ``k C + c``, with the neighbours ``k``
    ordered ``(row, col) = (0, 0), (1, 0), (0, 1), (1, 1)``.
    """
    *lead, width = t.shape
    grouped = t.reshape(*lead, width // 4, 4)[..., _UNFOLD_ORDER]  # (..., C, 4): neighbours in our order
    return grouped.transpose(-1, -2).reshape(*lead, width).contiguous()  # (..., 4, C) -> (..., 4C)


def concat_to_unfold(t: torch.Tensor) -> torch.Tensor:
    """The inverse of ``unfold_to_concat``: our patch-merging channel order -> ``nn.Unfold``'s, (..., 4C)."""
    *lead, width = t.shape
    grouped = t.reshape(*lead, 4, width // 4)[..., _UNFOLD_ORDER, :]  # (..., 4, C): neighbours in Unfold's order
    return grouped.transpose(-1, -2).reshape(*lead, width).contiguous()  # (..., C, 4) -> (..., 4C)


def _relative_position_index(window: int) -> torch.Tensor:
    """Swin's (w^2, w^2) index into the ((2w - 1)^2, heads) relative-position table."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    r, c = rows.flatten(), cols.flatten()  # (w^2,)
    dr = r[:, None] - r[None, :] + window - 1  # (w^2, w^2), in 0..2w-2
    dc = c[:, None] - c[None, :] + window - 1
    return dr * (2 * window - 1) + dc


def _window(table: torch.Tensor) -> int:
    """The window size of a ((2w - 1)^2, heads) relative-position table."""
    side = math.isqrt(int(table.shape[0]))
    if side * side != table.shape[0] or side % 2 == 0:
        raise ValueError(f"a relative-position table of {table.shape[0]} rows is not (2w - 1)^2 for a window w")
    return (side + 1) // 2


# --- mmdetection -> ours ---


def mmdet_state_dict(obj: object) -> StateDict:
    """The tensors of a loaded mmdetection file: its ``"state_dict"`` (or ``"model"``), or ``obj`` itself.

    Raises:
        ValueError: no ``{name: tensor}`` dict was found.
    """
    if isinstance(obj, dict):
        inner = next((obj[k] for k in _FILE_KEYS if isinstance(obj.get(k), dict)), obj)
        if inner and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in inner.items()):
            return dict(inner)
    raise ValueError("the file holds no state dict of tensors (looked for 'state_dict', 'model' and the top level)")


def looks_mmdet(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether the names are in mmdetection's layout (``backbone.stages.``, ``neck.``, ``bbox_head.``, ...)."""
    return any(name.removeprefix("module.").startswith(_MMDET_MARKERS) for name in sd)


def _neck_to_ours(name: str, convs: int) -> str | None:
    """``neck.convs.{i}`` -> ``input_proj.{i}``, ``neck.extra_convs.{j}`` -> ``input_proj.{convs + j}``."""
    m = _MM_NECK.match(name)
    if m is None:
        return None
    level = int(m["n"]) + (convs if m["list"] == "extra_convs" else 0)
    return f"input_proj.{level}.{0 if m['part'] == 'conv' else 1}.{m['rest']}"


def _head_rest(kind: str, rest: str) -> str | None:
    """A branch's name after ``cls_branches.{n}.`` / ``reg_branches.{n}.`` -> ours after the head (None: no such)."""
    if kind == "cls":
        return "bias" if rest == "bias" else None
    m = _REG_LAYER.match(rest)
    if m is None or int(m["index"]) % 2:  # the odd indices are ReLUs
        return None
    return f"layers.{int(m['index']) // 2}.{m['kind']}"


def _class_bias(t: torch.Tensor) -> torch.Tensor:
    """ContrastiveEmbed's (1,) bias -> our scalar ()."""
    return t.reshape(()) if t.shape == (1,) else t


def mmdet_to_ours(
    sd: Mapping[str, torch.Tensor], shared_boxes: bool, shared_classes: bool
) -> tuple[StateDict, list[str]]:
    """mmdetection names (a MM-Grounding-DINO or LLMDet file's ``"state_dict"``) -> ours.

    ``shared_boxes`` and ``shared_classes``: whether the model shares the decoder's box and class
    heads by all layers (``mmdet_config`` reads it from the file). Returns the converted dict and
    the names no rule places (the strict loader reports them).

    Raises:
        ConversionError: the heads are to be shared, but the file's decoder branches differ.
    """
    sd = _unwrapped(sd)
    decoder_layers = len(_indices(sd, r"decoder\.layers\.(\d+)\."))
    convs = len(_indices(sd, r"neck\.convs\.(\d+)\."))
    out: StateDict = {}
    unknown: list[str] = []
    heads: Copies = {}
    for name, t in sd.items():
        if any(p.match(name) for p in IGNORED_MMDET):
            continue
        if m := _MM_HEAD.match(name):
            head = "class_embed" if m["kind"] == "cls" else "bbox_embed"
            rest, n = _head_rest(m["kind"], m["rest"]), int(m["n"])
            value = _class_bias(t) if head == "class_embed" else t
            if rest is None or n > decoder_layers:
                unknown.append(name)
            elif n == decoder_layers:  # the last branch: the encoder's proposal head
                out[f"transformer.enc_out_{head}.{rest}"] = value
            else:
                heads.setdefault((head, n, rest), []).append((name, value))
            continue
        new = _neck_to_ours(name, convs) or _rename(name, _FORWARD)
        if new is None:
            unknown.append(name)
        else:
            out[new] = unfold_to_concat(t) if _OUR_DOWNSAMPLE.match(new) else t
    out.update(merge_heads(heads, shared_boxes, shared_classes))
    return out, unknown


# --- ours -> mmdetection ---


def _head_names(head: str, rest: str, branch: int) -> str:
    """Our head's ``rest`` (``bias``, ``layers.{k}.weight``) -> its name in ``bbox_head``'s branch."""
    if head == "class_embed":
        return f"bbox_head.cls_branches.{branch}.{rest}"
    m = _BOX_LAYER.match(rest)
    if m is None:
        raise ConversionError(f"no mmdetection name for the box head's {rest}")
    return f"bbox_head.reg_branches.{branch}.{2 * int(m['layer'])}.{m['kind']}"


def _head_to_mmdet(name: str, t: torch.Tensor, decoder_layers: int) -> StateDict | None:
    """A decoder or proposal head tensor under every mmdetection name it has (None: not a head)."""
    if m := _OUR_HEAD.match(name):
        branches = range(decoder_layers) if m["layer"] is None else [int(m["layer"])]
    elif m := _OUR_ENC_HEAD.match(name):
        branches = range(decoder_layers, decoder_layers + 1)
    else:
        return None
    value = t.reshape(1) if m["head"] == "class_embed" and t.dim() == 0 else t  # our scalar -> (1,)
    return {_head_names(m["head"], m["rest"], n): value for n in branches}


def _neck_to_mmdet(name: str, convs: int) -> str | None:
    m = _OUR_NECK.match(name)
    if m is None:
        return None
    level, part = int(m["n"]), "conv" if m["part"] == "0" else "gn"
    where = f"convs.{level}" if level < convs else f"extra_convs.{level - convs}"
    return f"neck.{where}.{part}.{m['rest']}"


def _recomputed_buffers(mm: StateDict) -> StateDict:
    """The buffers an mmdetection file holds that we recompute: each Swin block's relative-position
    index (w^2, w^2) and BERT's position ids (1, positions)."""
    out: StateDict = {}
    for name, table in mm.items():
        if name.endswith(".attn.w_msa.relative_position_bias_table"):
            index_name = name.removesuffix("relative_position_bias_table") + "relative_position_index"
            out[index_name] = _relative_position_index(_window(table))
    positions = mm.get(_BERT + "embeddings.position_embeddings.weight")
    if positions is not None:
        out[_BERT + "embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
    return out


def ours_to_mmdet(sd: Mapping[str, torch.Tensor], decoder_layers: int) -> StateDict:
    """Ours -> mmdetection names, as its ``state_dict`` is saved: every decoder branch (a shared head
    once per layer), the encoder's proposal head as branch ``decoder_layers``, and the buffers
    mmdetection keeps (Swin's relative-position index, BERT's position ids). The inverse of ``mmdet_to_ours``.

    Raises:
        ConversionError: a name has no mmdetection counterpart.
    """
    convs = len(_indices(sd, r"backbone\.norm(\d+)\.weight$"))  # one 1x1 neck conv per Swin output
    out: StateDict = {}
    for name, t in sd.items():
        heads = _head_to_mmdet(name, t, decoder_layers)
        if heads is not None:
            out.update(heads)
            continue
        new = _neck_to_mmdet(name, convs) or _rename(name, _BACKWARD)
        if new is None:
            raise ConversionError(f"no mmdetection name for {name}")
        out[new] = concat_to_unfold(t) if _OUR_DOWNSAMPLE.match(name) else t
    out.update(_recomputed_buffers(out))
    return out


# --- the architecture, from the tensors ---


def _not_mmdet_grounding_dino(sd: Mapping[str, torch.Tensor], missing: list[str]) -> str:
    prefixes = sorted({name.split(".")[0] + "." for name in sd})
    family = next((what for p, what in OTHER_LAYOUTS.items() if any(n.startswith(p) for n in sd)), None)
    if family is None and "query_embedding.weight" in sd and "backbone.patch_embed.projection.weight" not in sd:
        family = "an mmdetection Grounding DINO whose backbone is not a Swin"
    found = f" (it looks like {family})" if family else ""
    return (
        f"not an mmdetection Grounding DINO checkpoint{found}: it has no {', '.join(missing[:3])}; its tensors are "
        f"under {', '.join(prefixes[:8])}{' ...' if len(prefixes) > 8 else ''}. gdino reads mmdetection's "
        "MM-Grounding-DINO and LLMDet files (Swin backbone, BERT text encoder)"
    )


def _swin(sd: Mapping[str, torch.Tensor]) -> SwinConfig:
    """Swin's size from the patch embedding, the blocks, their position tables and the output norms."""
    embed, channels, patch, _ = sd["backbone.patch_embed.projection.weight"].shape  # (C, 3, p, p)
    stages = _count(sd, r"backbone\.stages\.(\d+)\.blocks\.0\.norm1\.weight$")
    depths = tuple(_count(sd, rf"backbone\.stages\.{i}\.blocks\.(\d+)\.norm1\.weight$") for i in range(stages))
    tables = [sd[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"] for i in range(stages)]
    hidden = sd["backbone.stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0]  # (mlp_ratio C, C)
    return SwinConfig(
        embed_dim=int(embed),
        depths=depths,
        num_heads=tuple(int(t.shape[1]) for t in tables),  # ((2w - 1)^2, heads)
        window_size=_window(tables[0]),
        mlp_ratio=hidden / embed,
        patch_size=int(patch),
        in_channels=int(channels),
        out_indices=tuple(sorted(_indices(sd, r"backbone\.norm(\d+)\.weight$"))),
    )


def _bert(sd: Mapping[str, torch.Tensor]) -> BertConfig:
    """BERT's size from its embeddings and layers (64 channels per head, as BERT-base)."""
    vocab, hidden = sd[_BERT + "embeddings.word_embeddings.weight"].shape
    return BertConfig(
        vocab_size=int(vocab),
        hidden_size=int(hidden),
        num_layers=_count(sd, re.escape(_BERT) + r"encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
        num_heads=max(1, int(hidden) // BERT_HEAD_DIM),
        intermediate_size=int(sd[_BERT + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(sd[_BERT + "embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(sd[_BERT + "embeddings.token_type_embeddings.weight"].shape[0]),
    )


def _points(sd: Mapping[str, torch.Tensor], attention: str, levels: int) -> int:
    """Sampling points per level and head: ``attention_weights`` has heads x levels x points rows."""
    rows = int(sd[attention + ".attention_weights.weight"].shape[0])
    if rows % (TRANSFORMER_HEADS * levels):
        raise ValueError(
            f"{attention}.attention_weights has {rows} rows, "
            f"not a multiple of {TRANSFORMER_HEADS} heads x {levels} levels"
        )
    return rows // (TRANSFORMER_HEADS * levels)


def _branches_equal(sd: Mapping[str, torch.Tensor], kind: str, decoder_layers: int) -> bool:
    """Whether every decoder layer's ``kind`` ("cls", "reg") branch holds the same tensors as layer 0's."""
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        m = _MM_HEAD.match(name)
        if m and m["kind"] == kind and int(m["n"]) < decoder_layers:
            per_layer.setdefault(int(m["n"]), {})[m["rest"]] = t
    first = per_layer.get(0, {})
    return all(
        branch.keys() == first.keys()
        and all(t.shape == first[k].shape and torch.equal(t, first[k]) for k, t in branch.items())
        for branch in per_layer.values()
    )


def _class_head(sd: Mapping[str, torch.Tensor]) -> str:
    """The model type the class head shows: a bias is MM-Grounding-DINO's, none the original Grounding DINO's."""
    if any(re.match(r"bbox_head\.cls_branches\.\d+\.log_scale$", name) for name in sd):
        raise ValueError(
            "the class head has a learnt log_scale (contrastive_cfg log_scale a number); gdino implements "
            "MM-Grounding-DINO's (log_scale 'auto', with a bias) and Grounding DINO's (neither)"
        )
    has_bias = any(re.match(r"bbox_head\.cls_branches\.\d+\.bias$", name) for name in sd)
    return MM_GROUNDING_DINO if has_bias else GROUNDING_DINO


def _check_derived_widths(sd: Mapping[str, torch.Tensor], config: GroundingDinoConfig) -> None:
    """The text layers' FFN and the fusion width are ``encoder_ffn_dim / 2`` in gdino; refuse a file that differs."""
    found = {
        "encoder.text_layers.0.ffn.layers.0.0.weight": int(sd["encoder.text_layers.0.ffn.layers.0.0.weight"].shape[0]),
        "encoder.fusion_layers.0.attn.v_proj.weight": int(sd["encoder.fusion_layers.0.attn.v_proj.weight"].shape[0]),
    }
    for name, width in found.items():
        if width != config.fusion_dim:
            raise ValueError(
                f"{name} is {width} wide; gdino builds it encoder_ffn_dim / 2 = {config.fusion_dim} wide "
                f"(encoder.layers.0.ffn is {config.encoder_ffn_dim})"
            )


def mmdet_config(sd: Mapping[str, torch.Tensor]) -> GroundingDinoConfig:
    """The ``GroundingDinoConfig`` of an mmdetection Grounding DINO state dict, from its tensors alone.

    Swin's width, depths, heads and window, the feature levels, d_model, the queries, the encoder
    and decoder depths and FFN widths, BERT's size, and whether the decoder heads are shared (all
    decoder branches equal) are read off the tensors; the rest is the published value (see the
    module docstring).

    Raises:
        ValueError: the tensors are not a Grounding DINO in mmdetection's layout, or one gdino does
            not implement; the message says what was found.
    """
    sd = _unwrapped(sd)
    missing = [name for name in REQUIRED if name not in sd]
    if missing:
        raise ValueError(_not_mmdet_grounding_dino(sd, missing))
    model_type = _class_head(sd)
    queries, d_model = sd["query_embedding.weight"].shape  # (num_queries, d_model)
    levels = int(sd["level_embed"].shape[0])  # (levels, d_model)
    decoder_layers = _count(sd, r"decoder\.layers\.(\d+)\.cross_attn\.sampling_offsets\.weight$")
    config = GroundingDinoConfig(
        swin=_swin(sd),
        text=_bert(sd),
        d_model=int(d_model),
        num_feature_levels=levels,
        num_queries=int(queries),
        encoder_layers=_count(sd, r"encoder\.layers\.(\d+)\.self_attn\.sampling_offsets\.weight$"),
        encoder_ffn_dim=int(sd["encoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
        encoder_heads=TRANSFORMER_HEADS,
        encoder_points=_points(sd, "encoder.layers.0.self_attn", levels),
        decoder_layers=decoder_layers,
        decoder_ffn_dim=int(sd["decoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
        decoder_heads=TRANSFORMER_HEADS,
        decoder_points=_points(sd, "decoder.layers.0.cross_attn", levels),
        model_type=model_type,
        share_box_heads=_branches_equal(sd, "reg", decoder_layers),
        share_class_heads=_branches_equal(sd, "cls", decoder_layers),
    )
    config.check()
    _check_derived_widths(sd, config)
    branches = _count(sd, r"bbox_head\.reg_branches\.(\d+)\.0\.weight$")
    if branches != decoder_layers + 1:
        raise ValueError(
            f"bbox_head has {branches} regression branches; a two-stage Grounding DINO with {decoder_layers} decoder "
            f"layers has {decoder_layers + 1} (one per layer and the encoder's proposal head)"
        )
    return config
