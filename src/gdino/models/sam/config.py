"""SAM and SAM-HQ configuration: frozen dataclasses, read from a Hugging Face ``config.json``.

``SamConfig.vit_b()``, ``vit_l()`` and ``vit_h()`` are the published architectures
(``facebook/sam-vit-base``, ``-large``, ``-huge``; the original ``sam_vit_b_01ec64.pth``,
``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``); ``hq=True`` gives SAM-HQ on the same ViT
(``syscv-community/sam-hq-vit-*``, ``sam_hq_vit_*.pth``). ``SamConfig.from_hf_dict`` reads the
``config.json`` that transformers' ``SamConfig`` and ``SamHQConfig`` write.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

SAM = "sam"
SAM_HQ = "sam_hq"
MODEL_TYPES = (SAM, SAM_HQ)

# Where the original repositories and transformers' port compute differently, and which one a
# model follows. "original" (segment-anything, sam-hq; the weights were trained with it; loading
# an original .pth chooses it), "transformers" (its SamModel / SamHQModel; loading the Hugging Face
# layout chooses it, so the outputs are transformers'):
#   decoder_norm_eps: the two-way transformer's block norms. The original builds them as
#     ``nn.LayerNorm(dim)`` (eps 1e-5); transformers gives them ``mask_decoder_config.layer_norm_eps``
#     (1e-6 in every published config.json). The final norm is 1e-5 in both.
#   hq_multimask: SAM-HQ's multi-mask output. The original keeps the one of the three multi-mask
#     masks with the best IoU score ("best": one mask, one score); transformers keeps all three,
#     sorted by score ("sorted"). Both add the HQ mask to what they keep.
#   hq_upscale_from: what SAM-HQ's mask decoder upscales into the mask features. The original
#     upscales the two-way transformer's image output ("output"). transformers' SamHQMaskDecoder
#     (5.x) never takes that output (``point_embedding, iou_token_out = self.transformer(...)``) and
#     upscales the transformer's image input (image embedding plus dense prompt) with its height and
#     width swapped ("input_transposed"), for the SAM masks and the HQ mask alike; the IoU scores
#     are unaffected. SAM (not HQ) upscales the output in both.
REFERENCES: dict[str, dict[str, Any]] = {
    "original": {"decoder_norm_eps": 1e-5, "hq_multimask": "best", "hq_upscale_from": "output"},
    "transformers": {"decoder_norm_eps": 1e-6, "hq_multimask": "sorted", "hq_upscale_from": "input_transposed"},
}
HQ_MULTIMASK = ("best", "sorted")
HQ_UPSCALE_FROM = ("output", "input_transposed")


@dataclass(frozen=True)
class SamVisionConfig:
    """The ViT image encoder (ViTDet-style: windowed blocks, a few global ones)."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    image_size: int = 1024
    patch_size: int = 16
    in_channels: int = 3
    mlp_dim: int = 3072
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        """Patches per side of the (square) input: the image embedding's height and width."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def window_of(self, block: int) -> int:
        """The block's attention window; 0 for a global-attention block."""
        return 0 if block in self.global_attn_indexes else self.window_size


VIT_B = SamVisionConfig()
VIT_L = SamVisionConfig(width=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23), mlp_dim=4096)
VIT_H = SamVisionConfig(width=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31), mlp_dim=5120)


@dataclass(frozen=True)
class SamConfig:
    """The whole model: image encoder, prompt encoder and mask decoder.

    ``prompt_dim`` is the width of everything after the ViT: the neck's output, the prompt
    embeddings, the two-way transformer and the mask decoder. ``hq`` adds SAM-HQ's HQ output token
    and its fusion of the first global block's ViT features. ``decoder_norm_eps``, ``hq_multimask``
    and ``hq_upscale_from`` are set by the reference implementation followed (``REFERENCES``).
    """

    vision: SamVisionConfig = field(default_factory=SamVisionConfig)
    prompt_dim: int = 256
    mask_in_channels: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    hq: bool = False
    decoder_norm_eps: float = 1e-5
    hq_multimask: str = "best"
    hq_upscale_from: str = "output"

    @property
    def model_type(self) -> str:
        return SAM_HQ if self.hq else SAM

    @property
    def num_mask_tokens(self) -> int:
        """The single-mask token and the multi-mask tokens (SAM-HQ's HQ token not counted)."""
        return self.num_multimask_outputs + 1

    @property
    def mask_input_size(self) -> int:
        """Side of a mask prompt: four times the image embedding's."""
        return 4 * self.vision.grid

    def with_reference(self, name: str) -> SamConfig:
        """This configuration computing as ``name`` ("original" or "transformers") does; see ``REFERENCES``."""
        if name not in REFERENCES:
            raise ValueError(f"reference must be one of {sorted(REFERENCES)}, not {name!r}")
        return replace(self, **REFERENCES[name])

    @classmethod
    def vit_b(cls, hq: bool = False) -> SamConfig:
        return cls(vision=VIT_B, hq=hq)

    @classmethod
    def vit_l(cls, hq: bool = False) -> SamConfig:
        return cls(vision=VIT_L, hq=hq)

    @classmethod
    def vit_h(cls, hq: bool = False) -> SamConfig:
        return cls(vision=VIT_H, hq=hq)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> SamConfig:
        """Reads a Hugging Face ``config.json`` (model_type ``sam`` or ``sam_hq``).

        The reference-dependent fields keep their defaults (the original's); see ``with_reference``.

        Raises:
            ValueError: another model_type, a value of the wrong type or range, or sizes that do not
                fit together; the message names the key.
        """
        model_type = d.get("model_type", SAM)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type is {model_type!r}; this model runs {' and '.join(repr(m) for m in MODEL_TYPES)} "
                "checkpoints (SAM, SAM-HQ)"
            )
        v, p, m = (_section(d, key) for key in ("vision_config", "prompt_encoder_config", "mask_decoder_config"))
        vision = _vision_from_hf(v)
        at_p, at_m = "prompt_encoder_config.", "mask_decoder_config."
        _require(p, "hidden_act", "gelu", at_p)
        _require(p, "num_point_embeddings", 4, at_p)
        _require(p, "layer_norm_eps", 1e-6, at_p)
        _require(m, "hidden_act", "relu", at_m)
        # transformers applies this to the two-way blocks' norms; every published file has 1e-6,
        # which REFERENCES["transformers"] holds (the original computes with 1e-5).
        _require(m, "layer_norm_eps", 1e-6, at_m)
        prompt_dim = _int(m, "hidden_size", 256, where=at_m)
        config = cls(
            vision=vision,
            prompt_dim=prompt_dim,
            mask_in_channels=_int(p, "mask_input_channels", 16, where=at_p),
            decoder_depth=_int(m, "num_hidden_layers", 2, where=at_m),
            decoder_heads=_int(m, "num_attention_heads", 8, where=at_m),
            decoder_mlp_dim=_int(m, "mlp_dim", 2048, where=at_m),
            attention_downsample_rate=_int(m, "attention_downsample_rate", 2, where=at_m),
            num_multimask_outputs=_int(m, "num_multimask_outputs", 3, where=at_m),
            iou_head_depth=_int(m, "iou_head_depth", 3, low=2, where=at_m),
            iou_head_hidden_dim=_int(m, "iou_head_hidden_dim", 256, where=at_m),
            hq=model_type == SAM_HQ,
        )
        _check_hf_sizes(config, v, p, m)
        config.check()
        return config

    def check(self) -> None:
        """Refuses sizes that do not fit together; each message names the ``config.json`` keys.

        Raises:
            ValueError: the first inconsistency found.
        """
        v = self.vision
        internal = self.prompt_dim // self.attention_downsample_rate
        at_m = "mask_decoder_config."
        pairs = [
            ("vision_config.hidden_size", v.width, "vision_config.num_attention_heads", v.num_heads),
            (f"{at_m}hidden_size", self.prompt_dim, f"{at_m}num_attention_heads", self.decoder_heads),
            (f"{at_m}hidden_size", self.prompt_dim, f"{at_m}attention_downsample_rate", self.attention_downsample_rate),
            (
                f"{at_m}hidden_size / attention_downsample_rate",
                internal,
                f"{at_m}num_attention_heads",
                self.decoder_heads,
            ),
        ]
        for width_name, width, parts_name, parts in pairs:
            if width < parts or width % parts:
                raise ValueError(f"{width_name} = {width} cannot be split into {parts_name} = {parts} parts")
        if v.image_size % v.patch_size:
            raise ValueError(f"vision_config.image_size = {v.image_size} is not a multiple of patch_size")
        if self.prompt_dim % 8:
            raise ValueError(f"mask_decoder_config.hidden_size = {self.prompt_dim} must be a multiple of 8")
        if self.mask_in_channels % 4:
            raise ValueError(
                f"prompt_encoder_config.mask_input_channels = {self.mask_in_channels} must be a multiple of 4"
            )
        if any(not 0 <= i < v.depth for i in v.global_attn_indexes):
            raise ValueError(
                f"vision_config.global_attn_indexes {list(v.global_attn_indexes)} must index the "
                f"num_hidden_layers = {v.depth} blocks"
            )
        if self.hq and not v.global_attn_indexes:
            raise ValueError(
                "SAM-HQ fuses the first global block's features: vision_config.global_attn_indexes is empty"
            )
        if self.hq_multimask not in HQ_MULTIMASK:
            raise ValueError(f"hq_multimask must be one of {HQ_MULTIMASK}, not {self.hq_multimask!r}")
        if self.hq_upscale_from not in HQ_UPSCALE_FROM:
            raise ValueError(f"hq_upscale_from must be one of {HQ_UPSCALE_FROM}, not {self.hq_upscale_from!r}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` for this configuration (inverse of ``from_hf_dict``)."""
        v = self.vision
        suffix = "_hq" if self.hq else ""
        decoder: dict[str, Any] = {
            "model_type": f"sam{suffix}_mask_decoder",
            "hidden_size": self.prompt_dim,
            "hidden_act": "relu",
            "mlp_dim": self.decoder_mlp_dim,
            "num_hidden_layers": self.decoder_depth,
            "num_attention_heads": self.decoder_heads,
            "attention_downsample_rate": self.attention_downsample_rate,
            "num_multimask_outputs": self.num_multimask_outputs,
            "iou_head_depth": self.iou_head_depth,
            "iou_head_hidden_dim": self.iou_head_hidden_dim,
            "layer_norm_eps": 1e-6,
        }
        if self.hq:
            decoder["vit_dim"] = v.width
        return {
            "model_type": self.model_type,
            "architectures": ["SamHQModel" if self.hq else "SamModel"],
            "vision_config": {
                "model_type": f"sam{suffix}_vision_model",
                "hidden_size": v.width,
                "output_channels": self.prompt_dim,
                "num_hidden_layers": v.depth,
                "num_attention_heads": v.num_heads,
                "num_channels": v.in_channels,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_act": "gelu",
                "layer_norm_eps": v.layer_norm_eps,
                "qkv_bias": v.qkv_bias,
                "use_abs_pos": v.use_abs_pos,
                "use_rel_pos": v.use_rel_pos,
                "window_size": v.window_size,
                "global_attn_indexes": list(v.global_attn_indexes),
                "num_pos_feats": self.prompt_dim // 2,
                "mlp_dim": v.mlp_dim,
            },
            "prompt_encoder_config": {
                "model_type": f"sam{suffix}_prompt_encoder",
                "hidden_size": self.prompt_dim,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "mask_input_channels": self.mask_in_channels,
                "num_point_embeddings": 4,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-6,
            },
            "mask_decoder_config": decoder,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vision_from_hf(v: dict[str, Any]) -> SamVisionConfig:
    """The ``vision_config`` of a Hugging Face ``config.json``."""
    at = "vision_config."
    _require(v, "hidden_act", "gelu", at)
    width = _int(v, "hidden_size", 768, where=at)
    mlp_dim = v.get("mlp_dim")
    if mlp_dim is None:  # transformers' default: mlp_ratio * hidden_size
        mlp_dim = int(width * _float(v, "mlp_ratio", 4.0, where=at))
    return SamVisionConfig(
        width=width,
        depth=_int(v, "num_hidden_layers", 12, where=at),
        num_heads=_int(v, "num_attention_heads", 12, where=at),
        global_attn_indexes=_indexes(v, "global_attn_indexes", (2, 5, 8, 11), where=at),
        window_size=_int(v, "window_size", 14, where=at),
        image_size=_int(v, "image_size", 1024, where=at),
        patch_size=_int(v, "patch_size", 16, where=at),
        in_channels=_int(v, "num_channels", 3, where=at),
        mlp_dim=_int({"mlp_dim": mlp_dim}, "mlp_dim", 0, where=at),
        qkv_bias=_flag(v, "qkv_bias", True, where=at),
        use_abs_pos=_flag(v, "use_abs_pos", True, where=at),
        use_rel_pos=_flag(v, "use_rel_pos", True, where=at),
        layer_norm_eps=_float(v, "layer_norm_eps", 1e-6, where=at),
    )


def _check_hf_sizes(config: SamConfig, v: dict[str, Any], p: dict[str, Any], m: dict[str, Any]) -> None:
    """The widths and sizes that transformers keeps in several places must agree."""
    vision = config.vision
    same = [
        ("vision_config.output_channels", _int(v, "output_channels", 256, where="vision_config.")),
        ("prompt_encoder_config.hidden_size", _int(p, "hidden_size", 256, where="prompt_encoder_config.")),
        ("2 * vision_config.num_pos_feats", 2 * _int(v, "num_pos_feats", 128, where="vision_config.")),
    ]
    for name, value in same:
        if value != config.prompt_dim:
            raise ValueError(f"{name} = {value} must equal mask_decoder_config.hidden_size = {config.prompt_dim}")
    at_p = "prompt_encoder_config."
    for key, value in (("image_size", vision.image_size), ("patch_size", vision.patch_size)):
        if _int(p, key, value, where=at_p) != value:
            raise ValueError(f"{at_p}{key} = {p[key]} must equal vision_config.{key} = {value}")
    if "image_embedding_size" in p and _int(p, "image_embedding_size", vision.grid, where=at_p) != vision.grid:
        raise ValueError(f"{at_p}image_embedding_size = {p['image_embedding_size']} must be image_size // patch_size")
    if config.hq and _int(m, "vit_dim", vision.width, where="mask_decoder_config.") != vision.width:
        raise ValueError(
            f"mask_decoder_config.vit_dim = {m['vit_dim']} must equal vision_config.hidden_size = {vision.width} "
            "(SAM-HQ fuses the ViT's own features)"
        )


def _section(d: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested config (``vision_config``, ...); absent means the defaults."""
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object, got {type(value).__name__}")
    return value


def _int(d: dict[str, Any], key: str, default: int, low: int = 1, where: str = "") -> int:
    """``d[key]`` as a whole number of at least ``low`` (``default`` when absent)."""
    value = d.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}{key} must be a whole number >= {low}, got {value!r}")
    return value


def _indexes(d: dict[str, Any], key: str, default: tuple[int, ...], where: str = "") -> tuple[int, ...]:
    """``d[key]`` as a list of block indexes (whole numbers >= 0; may be empty)."""
    value = d.get(key, default)
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}{key} must be a list of whole numbers, got {value!r}")
    return tuple(_int({key: i}, key, 0, low=0, where=where) for i in value)


def _float(d: dict[str, Any], key: str, default: float, where: str = "") -> float:
    """``d[key]`` as a finite positive number (``default`` when absent)."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}{key} must be a positive number, got {value!r}")
    return float(value)


def _flag(d: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}{key} must be true or false, got {value!r}")
    return value


def _require(d: dict[str, Any], key: str, value: Any, where: str = "") -> None:
    if key in d and d[key] != value:
        raise ValueError(
            f"config.json has {where}{key}={d[key]!r}; gdino implements the published architecture, which has {value!r}"
        )
