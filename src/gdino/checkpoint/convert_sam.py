"""Pure key conversion for SAM and SAM-HQ checkpoints, and their architecture read from the tensors.

Our parameter names are the original repositories' (``sam_vit_b_01ec64.pth`` and the other
segment-anything files, SysCV's ``sam_hq_vit_*.pth``): ``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*``, so an original file loads as it is; only ``pixel_mean`` / ``pixel_std``
(normalisation constants some files hold, which the processor applies) are dropped, and a
``module.`` prefix (a file saved from DistributedDataParallel) is removed. The Hugging Face layout
(as transformers' ``SamModel`` / ``SamHQModel`` save it) maps onto those names through one rule
table, plus two rules no table can hold: transformers names an MLP's first and last layers
``proj_in`` / ``proj_out`` and the rest ``layers.{k - 1}``, and it may store the positional
encoding's matrix twice (``shared_image_embedding.positional_embedding`` and the tied
``prompt_encoder.shared_embedding.positional_embedding``; the copies must be equal).

Every function maps a ``{name: tensor}`` dict to another and does no IO; names that no rule maps
are returned for the strict loader to report.
"""

from __future__ import annotations

import re

import torch

from gdino.checkpoint.convert import ConversionError
from gdino.models.sam.config import SamConfig, SamVisionConfig

StateDict = dict[str, torch.Tensor]

IGNORED_ORIGINAL = (re.compile(r"^pixel_(mean|std)$"),)
OUR_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

_PE_OURS = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_PE_HF = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_VIT = "vision_encoder."
_MD = "mask_decoder."

# (Hugging Face name prefix, our name prefix). "{n}" stands for a number; the rest of the name
# (".weight", ".bias", ...) carries over unchanged. A prefix ending in "$" is a whole name.
_RULES: list[tuple[str, str]] = [
    # ViT and neck
    (_VIT + "patch_embed.projection.", "image_encoder.patch_embed.proj."),
    (_VIT + "pos_embed$", "image_encoder.pos_embed$"),
    (_VIT + "layers.{0}.layer_norm1.", "image_encoder.blocks.{0}.norm1."),
    (_VIT + "layers.{0}.layer_norm2.", "image_encoder.blocks.{0}.norm2."),
    (_VIT + "layers.{0}.attn.", "image_encoder.blocks.{0}.attn."),
    (_VIT + "layers.{0}.mlp.", "image_encoder.blocks.{0}.mlp."),
    (_VIT + "neck.conv1.", "image_encoder.neck.0."),
    (_VIT + "neck.layer_norm1.", "image_encoder.neck.1."),
    (_VIT + "neck.conv2.", "image_encoder.neck.2."),
    (_VIT + "neck.layer_norm2.", "image_encoder.neck.3."),
    # Prompt encoder
    ("prompt_encoder.point_embed.{0}.", "prompt_encoder.point_embeddings.{0}."),
    ("prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    ("prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    ("prompt_encoder.mask_embed.conv1.", "prompt_encoder.mask_downscaling.0."),
    ("prompt_encoder.mask_embed.layer_norm1.", "prompt_encoder.mask_downscaling.1."),
    ("prompt_encoder.mask_embed.conv2.", "prompt_encoder.mask_downscaling.3."),
    ("prompt_encoder.mask_embed.layer_norm2.", "prompt_encoder.mask_downscaling.4."),
    ("prompt_encoder.mask_embed.conv3.", "prompt_encoder.mask_downscaling.6."),
    # Two-way transformer
    (_MD + "transformer.layers.{0}.layer_norm{1}.", _MD + "transformer.layers.{0}.norm{1}."),
    (_MD + "transformer.layers.{0}.self_attn.", _MD + "transformer.layers.{0}.self_attn."),
    (
        _MD + "transformer.layers.{0}.cross_attn_token_to_image.",
        _MD + "transformer.layers.{0}.cross_attn_token_to_image.",
    ),
    (
        _MD + "transformer.layers.{0}.cross_attn_image_to_token.",
        _MD + "transformer.layers.{0}.cross_attn_image_to_token.",
    ),
    (_MD + "transformer.layers.{0}.mlp.", _MD + "transformer.layers.{0}.mlp."),
    (_MD + "transformer.final_attn_token_to_image.", _MD + "transformer.final_attn_token_to_image."),
    (_MD + "transformer.layer_norm_final_attn.", _MD + "transformer.norm_final_attn."),
    # Mask decoder
    (_MD + "iou_token.", _MD + "iou_token."),
    (_MD + "mask_tokens.", _MD + "mask_tokens."),
    (_MD + "upscale_conv1.", _MD + "output_upscaling.0."),
    (_MD + "upscale_layer_norm.", _MD + "output_upscaling.1."),
    (_MD + "upscale_conv2.", _MD + "output_upscaling.3."),
    # SAM-HQ
    (_MD + "hq_token.", _MD + "hf_token."),
    (_MD + "compress_vit_conv1.", _MD + "compress_vit_feat.0."),
    (_MD + "compress_vit_norm.", _MD + "compress_vit_feat.1."),
    (_MD + "compress_vit_conv2.", _MD + "compress_vit_feat.3."),
    (_MD + "encoder_conv1.", _MD + "embedding_encoder.0."),
    (_MD + "encoder_norm.", _MD + "embedding_encoder.1."),
    (_MD + "encoder_conv2.", _MD + "embedding_encoder.3."),
    (_MD + "mask_conv1.", _MD + "embedding_maskfeature.0."),
    (_MD + "mask_norm.", _MD + "embedding_maskfeature.1."),
    (_MD + "mask_conv2.", _MD + "embedding_maskfeature.3."),
]

# The mask decoder's MLPs (SAM-HQ's is "hq_mask_mlp" in transformers, "hf_mlp" in the original).
_HF_MLP = re.compile(
    r"^mask_decoder\.(?P<mlp>output_hypernetworks_mlps\.\d+|iou_prediction_head|hq_mask_mlp)\."
    r"(?P<layer>proj_in|proj_out|layers\.(?P<k>\d+))\.(?P<rest>weight|bias)$"
)
_OUR_MLP = re.compile(
    r"^mask_decoder\.(?P<mlp>output_hypernetworks_mlps\.\d+|iou_prediction_head|hf_mlp)\.layers\.(?P<k>\d+)\."
    r"(?P<rest>weight|bias)$"
)
_MLP_TO_OURS = {"hq_mask_mlp": "hf_mlp"}
_MLP_TO_HF = {v: k for k, v in _MLP_TO_OURS.items()}


def _compile(template: str) -> re.Pattern[str]:
    """``a.{0}.b.`` -> a regex matching names starting so; a trailing ``$`` means the whole name."""
    exact = template.endswith("$")
    body = re.sub(r"\\\{(\d)\\\}", r"(?P<n\1>\\d+)", re.escape(template.rstrip("$")))
    return re.compile("^" + body + ("$" if exact else ""))


def _fill(template: str, m: re.Match[str]) -> str:
    numbers = m.groupdict()
    return re.sub(r"\{(\d)\}", lambda g: numbers["n" + g.group(1)], template.rstrip("$"))


_FORWARD = [(_compile(hf), ours) for hf, ours in _RULES]
_BACKWARD = [(_compile(ours), hf) for hf, ours in _RULES]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if m := pattern.match(name):
            return _fill(template, m) + name[m.end() :]
    return None


def _hf_mlps(found: dict[tuple[str, str, str], torch.Tensor]) -> StateDict:
    """transformers' MLP names -> ours: ``proj_in`` is ``layers.0``, ``layers.k`` is ``layers.{k + 1}``
    and ``proj_out`` the last, after however many middle layers that MLP has."""
    middle: dict[str, set[str]] = {}
    for mlp, layer, _ in found:
        middle.setdefault(mlp, set())
        if layer.startswith("layers."):
            middle[mlp].add(layer)
    out: StateDict = {}
    for (mlp, layer, rest), t in found.items():
        if layer == "proj_in":
            k = 0
        elif layer == "proj_out":
            k = len(middle[mlp]) + 1
        else:
            k = int(layer.removeprefix("layers.")) + 1
        out[f"mask_decoder.{_MLP_TO_OURS.get(mlp, mlp)}.layers.{k}.{rest}"] = t
    return out


def _positional(copies: list[tuple[str, torch.Tensor]]) -> StateDict:
    """The positional encoding's matrix, stored once or twice (tied) in the Hugging Face layout."""
    if not copies:
        return {}
    (first_name, first), *others = copies
    for name, t in others:
        if t.shape != first.shape or not torch.equal(t, first):
            raise ConversionError(f"{name} != {first_name}: transformers ties them, so they must hold the same values")
    return {_PE_OURS: first}


def hf_to_ours(sd: StateDict) -> tuple[StateDict, list[str]]:
    """Hugging Face ``SamModel`` / ``SamHQModel`` names -> ours.

    Returns the converted dict and the names no rule maps (the strict loader reports them).

    Raises:
        ConversionError: the two stored copies of the positional encoding differ.
    """
    out: StateDict = {}
    unknown: list[str] = []
    mlps: dict[tuple[str, str, str], torch.Tensor] = {}
    pe: list[tuple[str, torch.Tensor]] = []
    for name, t in sd.items():
        if name in _PE_HF:
            pe.append((name, t))
        elif m := _HF_MLP.match(name):
            mlps[(m["mlp"], m["layer"], m["rest"])] = t
        elif (new := _rename(name, _FORWARD)) is not None:
            out[new] = t
        else:
            unknown.append(name)
    out.update(_hf_mlps(mlps))
    out.update(_positional(pe))
    return out, unknown


def ours_to_hf(sd: StateDict) -> StateDict:
    """Ours -> Hugging Face names as ``save_pretrained`` writes them; the inverse of ``hf_to_ours``.

    Raises:
        ConversionError: a name that has no Hugging Face counterpart.
    """
    last: dict[str, int] = {}
    for name in sd:
        if m := _OUR_MLP.match(name):
            last[m["mlp"]] = max(last.get(m["mlp"], 0), int(m["k"]))
    out: StateDict = {}
    for name, t in sd.items():
        if name == _PE_OURS:
            out[_PE_HF[0]] = t
        elif m := _OUR_MLP.match(name):
            k, mlp = int(m["k"]), m["mlp"]
            layer = "proj_in" if k == 0 else "proj_out" if k == last[mlp] else f"layers.{k - 1}"
            out[f"mask_decoder.{_MLP_TO_HF.get(mlp, mlp)}.{layer}.{m['rest']}"] = t
        elif (new := _rename(name, _BACKWARD)) is not None:
            out[new] = t
        else:
            raise ConversionError(f"no Hugging Face name for {name}")
    return out


def original_to_ours(sd: StateDict) -> tuple[StateDict, list[str]]:
    """Original repository names (segment-anything, sam-hq) -> ours: the same, ``pixel_mean`` and
    ``pixel_std`` dropped and a ``module.`` prefix removed.

    Returns the converted dict and the names outside the model's three parts.
    """
    out: StateDict = {}
    unknown: list[str] = []
    for name, t in sd.items():
        name = name.removeprefix("module.")
        if any(p.match(name) for p in IGNORED_ORIGINAL):
            continue
        if name.startswith(OUR_PREFIXES):
            out[name] = t
        else:
            unknown.append(name)
    return out, unknown


def ours_to_original(sd: StateDict) -> StateDict:
    """Ours -> original repository names (the same names: a copy of the dict)."""
    return dict(sd)


def _count(sd: StateDict, pattern: str) -> int:
    """How many distinct ``{n}`` the names matching ``pattern`` (a regex with one group) have."""
    found = {m.group(1) for name in sd if (m := re.match(pattern, name))}
    return len(found)


def _shape(sd: StateDict, name: str) -> tuple[int, ...]:
    if name not in sd:
        raise ValueError(f"the file has no {name}, which every SAM checkpoint holds")
    return tuple(sd[name].shape)


# The two-way transformer's heads are not in the tensors; every published model has 8.
PUBLISHED_DECODER_HEADS = 8


def _vision_from_tensors(sd: StateDict) -> SamVisionConfig:
    width, in_channels, patch, _ = _shape(sd, "image_encoder.patch_embed.proj.weight")
    depth = _count(sd, r"^image_encoder\.blocks\.(\d+)\.")
    if "image_encoder.blocks.0.attn.rel_pos_h" not in sd:
        raise ValueError("the file has no relative positions (rel_pos_h): its windows cannot be read; give a config")
    tables = [_shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    grid = _shape(sd, "image_encoder.pos_embed")[1] if "image_encoder.pos_embed" in sd else (max(tables)[0] + 1) // 2
    global_blocks = tuple(i for i, (rows, _) in enumerate(tables) if rows == 2 * grid - 1)
    windows = {(rows + 1) // 2 for i, (rows, _) in enumerate(tables) if i not in global_blocks}
    if len(windows) > 1:
        raise ValueError(f"the windowed blocks' relative positions give several window sizes: {sorted(windows)}")
    return SamVisionConfig(
        width=width,
        depth=depth,
        num_heads=width // tables[0][1],
        global_attn_indexes=global_blocks,
        window_size=windows.pop() if windows else 14,
        image_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        mlp_dim=_shape(sd, "image_encoder.blocks.0.mlp.lin1.weight")[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        use_abs_pos="image_encoder.pos_embed" in sd,
    )


def config_from_tensors(sd: StateDict) -> SamConfig:
    """The architecture a state dict under our (the original's) names shows, for a file with no
    ``config.json``; the reference-dependent fields keep the original's values.

    The decoder's number of heads is not in the tensors: it is the published 8.

    Raises:
        ValueError: a tensor every SAM file holds is missing (the message names it).
    """
    dim = _shape(sd, "image_encoder.neck.0.weight")[0]
    q = _shape(sd, "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")
    config = SamConfig(
        vision=_vision_from_tensors(sd),
        prompt_dim=dim,
        mask_in_channels=_shape(sd, "prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=_count(sd, r"^mask_decoder\.transformer\.layers\.(\d+)\."),
        decoder_heads=PUBLISHED_DECODER_HEADS,
        decoder_mlp_dim=_shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        attention_downsample_rate=dim // q[0],
        num_multimask_outputs=_shape(sd, "mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(sd, r"^mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
        iou_head_hidden_dim=_shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight")[0],
        hq="mask_decoder.hf_token.weight" in sd,
    )
    config.check()
    return config
