"""SAM 2.1 image-model configuration: frozen dataclasses, read from a Hugging Face ``config.json``.

``Sam2Config.tiny()``, ``small()``, ``base_plus()`` and ``large()`` are the four published sizes
(``facebook/sam2.1-hiera-tiny``, ``-small``, ``-base-plus``, ``-large``; the original
``sam2.1_hiera_{tiny,small,base_plus,large}.pt`` built from ``configs/sam2.1/sam2.1_hiera_*.yaml``).
``Sam2Config.from_hf_dict`` reads the ``config.json`` that transformers' ``Sam2Config`` (model_type
``sam2``) or ``Sam2VideoConfig`` (``sam2_video``, whose video settings the image model ignores) write;
``to_hf_dict`` writes it back.

Only what the image model computes is configurable; settings every published checkpoint shares and
that the code does not generalise over (four Hiera stages, 1x1 FPN convolutions, three feature
levels, four point embeddings) are checked and refused with a message naming the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gdino.models.sam2.config_values import (
    DECODER_KEYS,
    HIERA_KEYS,
    PROMPT_KEYS,
    VISION_KEYS,
    flag,
    known,
    pair,
    positive,
    require,
    same,
    section,
    whole,
    wholes,
)

MODEL_TYPES = ("sam2", "sam2_video")


@dataclass(frozen=True)
class HieraConfig:
    """The Hiera trunk: four stages of windowed (or global) attention blocks, each stage after the
    first halving the resolution by pooling its first block's queries. Defaults are hiera-tiny."""

    embed_dims: tuple[int, ...] = (96, 192, 384, 768)  # per stage
    num_heads: tuple[int, ...] = (1, 2, 4, 8)  # per stage
    stages: tuple[int, ...] = (1, 2, 7, 2)  # blocks per stage
    global_att_blocks: tuple[int, ...] = (5, 7, 9)  # block indices (over all stages) with global attention
    window_spec: tuple[int, ...] = (8, 4, 14, 7)  # window side per stage (a stage's first block keeps the last's)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)  # the background position embedding, before resizing
    q_pool: int = 3  # how many stage changes pool their queries
    q_stride: tuple[int, int] = (2, 2)
    mlp_ratio: float = 4.0
    patch_kernel_size: tuple[int, int] = (7, 7)
    patch_stride: tuple[int, int] = (4, 4)
    patch_padding: tuple[int, int] = (3, 3)
    in_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def depth(self) -> int:
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """The index of each stage's last block."""
        return tuple(sum(self.stages[: i + 1]) - 1 for i in range(len(self.stages)))


@dataclass(frozen=True)
class MaskDecoderConfig:
    """The two-way transformer and the mask, IoU and object-score heads (the same in every size)."""

    depth: int = 2  # two-way attention blocks
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample_rate: int = 2  # the cross attentions' inner width is d_model / this
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # Single-mask output falls back to the best multi-mask mask when mask 0 is unstable (the
    # original's build_sam2 sets these for inference; transformers' config holds the same).
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98


_SMALL = HieraConfig(stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13))
_BASE_PLUS = HieraConfig(
    embed_dims=(112, 224, 448, 896),
    num_heads=(2, 4, 8, 16),
    stages=(2, 3, 16, 3),
    global_att_blocks=(12, 16, 20),
    window_pos_embed_bkg_spatial_size=(14, 14),
)
_LARGE = HieraConfig(
    embed_dims=(144, 288, 576, 1152),
    num_heads=(2, 4, 8, 16),
    stages=(2, 6, 36, 4),
    global_att_blocks=(23, 33, 43),
    window_spec=(8, 4, 16, 8),
)


@dataclass(frozen=True)
class Sam2Config:
    """The SAM 2.1 image model. Defaults are sam2.1-hiera-tiny.

    ``image_size`` is the square side the image is resized to; the image embedding is
    ``image_size / 16`` on a side (64), the high-resolution features 2x and 4x that, the masks 4x.
    """

    hiera: HieraConfig = field(default_factory=HieraConfig)
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    image_size: int = 1024
    d_model: int = 256  # the FPN neck, the prompt encoder and the mask decoder
    fpn_top_down_levels: tuple[int, ...] = (2, 3)  # neck levels (0 = highest resolution) given top-down features
    mask_in_chans: int = 16  # the mask-input downscaler's width

    @classmethod
    def tiny(cls) -> Sam2Config:
        """sam2.1-hiera-tiny: 31.4M parameters (38.9M published, with the video model's)."""
        return cls()

    @classmethod
    def small(cls) -> Sam2Config:
        """sam2.1-hiera-small: 38.5M (46M published)."""
        return cls(hiera=_SMALL)

    @classmethod
    def base_plus(cls) -> Sam2Config:
        """sam2.1-hiera-base-plus: 73.3M (80.8M published)."""
        return cls(hiera=_BASE_PLUS)

    @classmethod
    def large(cls) -> Sam2Config:
        """sam2.1-hiera-large: 216.9M (224.4M published)."""
        return cls(hiera=_LARGE)

    @classmethod
    def shapes(cls) -> Sam2Config:
        """gdino-shapes-sam, trained here on the synthetic shapes (256-384 px images): 2.2M parameters.

        The same modules as the published sizes, narrower and shallower (six Hiera blocks, one
        global), at a 256 px input, so the masks come out at 64 x 64. Single-mask output is what it
        is trained for, so the multi-mask fallback is off.
        """
        hiera = HieraConfig(
            embed_dims=(32, 64, 128, 256),
            num_heads=(1, 1, 2, 4),
            stages=(1, 1, 3, 1),
            global_att_blocks=(4,),
            window_spec=(8, 4, 8, 4),
        )
        decoder = MaskDecoderConfig(
            num_heads=4, mlp_dim=512, iou_head_hidden_dim=128, dynamic_multimask_via_stability=False
        )
        return cls(hiera=hiera, decoder=decoder, image_size=256, d_model=128)

    @property
    def backbone_stride(self) -> int:
        """Input pixels per image-embedding cell: the patch stride times two query poolings."""
        return self.hiera.patch_stride[0] * self.hiera.q_stride[0] ** 2

    @property
    def embedding_size(self) -> int:
        """The image embedding's side (64 for 1024)."""
        return self.image_size // self.backbone_stride

    @property
    def feature_sizes(self) -> tuple[int, int, int]:
        """The sides of the three feature maps the decoder reads, highest resolution first."""
        e = self.embedding_size
        return (4 * e, 2 * e, e)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Refuses settings the modules cannot be built with; each message names the config.json key.

        Raises:
            ValueError: the first inconsistency found.
        """
        h, d = self.hiera, self.decoder
        at = "vision_config.backbone_config."
        n = len(h.stages)
        if n != 4:
            raise ValueError(f"{at}blocks_per_stage has {n} stages; SAM 2 has 4 (its neck reads four levels)")
        for key, value in (
            ("embed_dim_per_stage", h.embed_dims),
            ("num_attention_heads_per_stage", h.num_heads),
            ("window_size_per_stage", h.window_spec),
        ):
            if len(value) != n:
                raise ValueError(f"{at}{key} has {len(value)} entries, blocks_per_stage {n}")
        if h.q_pool != 3 or h.q_stride[0] != h.q_stride[1] or h.patch_stride[0] != h.patch_stride[1]:
            raise ValueError(
                f"{at}num_query_pool_stages must be 3 and query_stride and patch_stride square "
                f"(got {h.q_pool}, {list(h.q_stride)}, {list(h.patch_stride)}): each stage halves the resolution"
            )
        for i, (width, heads) in enumerate(zip(h.embed_dims, h.num_heads)):
            if heads < 1 or width % heads:
                raise ValueError(f"{at}embed_dim_per_stage[{i}] = {width} cannot be split into {heads} heads")
        if any(not 0 <= b < h.depth for b in h.global_att_blocks):
            raise ValueError(f"{at}global_attention_blocks {list(h.global_att_blocks)} name blocks beyond {h.depth}")
        side = self.image_size // h.patch_stride[0]
        if self.image_size % (self.backbone_stride * 2) or side % h.window_spec[0]:
            raise ValueError(
                f"image_size = {self.image_size} must be a multiple of {self.backbone_stride * 2} whose patch grid "
                f"({side}) the first window ({h.window_spec[0]}) divides"
            )
        if any(not 0 <= level < n for level in self.fpn_top_down_levels):
            raise ValueError(
                f"vision_config.fpn_top_down_levels {list(self.fpn_top_down_levels)} must be in 0..{n - 1}"
            )
        if (
            self.d_model % 8
            or (self.d_model // d.attention_downsample_rate) % d.num_heads
            or self.d_model % d.num_heads
        ):
            raise ValueError(
                f"hidden_size = {self.d_model} must be a multiple of 8 and split into mask_decoder_config."
                f"num_attention_heads = {d.num_heads} at full and 1/{d.attention_downsample_rate} width"
            )
        if self.mask_in_chans % 4:
            raise ValueError(
                f"prompt_encoder_config.mask_input_channels = {self.mask_in_chans} must be a multiple of 4"
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Sam2Config:
        """Reads a Hugging Face ``config.json`` (model_type ``sam2`` or ``sam2_video``).

        Raises:
            ValueError: another model type, a key the image model does not know, or a value it cannot
                be built with; the message names the key.
        """
        model_type = d.get("model_type", "sam2")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type is {model_type!r}; a SAM 2 config.json has {' or '.join(MODEL_TYPES)}")
        video = model_type == "sam2_video"
        known(d, "", {"vision_config", "prompt_encoder_config", "mask_decoder_config", "image_size"}, video=video)
        vision = section(d, "vision_config")
        prompt = section(d, "prompt_encoder_config")
        decoder = section(d, "mask_decoder_config")
        backbone = section(vision, "backbone_config", "vision_config.")
        hiera = _hiera_from_hf(backbone)
        config = cls(
            hiera=hiera,
            decoder=_decoder_from_hf(decoder),
            image_size=whole(prompt, "image_size", 1024, "prompt_encoder_config."),
            d_model=whole(vision, "fpn_hidden_size", 256, "vision_config."),
            fpn_top_down_levels=wholes(vision, "fpn_top_down_levels", (2, 3), "vision_config.", low=0),
            mask_in_chans=whole(prompt, "mask_input_channels", 16, "prompt_encoder_config."),
        )
        _check_vision(vision, config)
        _check_prompt_encoder(prompt, config)
        same(decoder, "hidden_size", config.d_model, "mask_decoder_config.", "vision_config.fpn_hidden_size")
        if "image_size" in d:
            same(d, "image_size", config.image_size, "", "prompt_encoder_config.image_size")
        side = config.image_size
        if pair(backbone, "image_size", (side, side), "vision_config.backbone_config.") != (side, side):
            raise ValueError(
                f"config.json has vision_config.backbone_config.image_size = {backbone['image_size']!r}, "
                f"but prompt_encoder_config.image_size gives {side}"
            )
        config.check()
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` transformers' ``Sam2Config`` writes for this configuration; ``from_hf_dict`` reads it."""
        h, d = self.hiera, self.decoder
        return {
            "model_type": "sam2",
            "architectures": ["Sam2Model"],
            "vision_config": {
                "model_type": "sam2_vision_model",
                "backbone_config": {
                    "model_type": "sam2_hiera_det_model",
                    "hidden_size": h.embed_dims[0],
                    "num_attention_heads": h.num_heads[0],
                    "num_channels": h.in_channels,
                    "image_size": [self.image_size, self.image_size],
                    "patch_kernel_size": list(h.patch_kernel_size),
                    "patch_stride": list(h.patch_stride),
                    "patch_padding": list(h.patch_padding),
                    "query_stride": list(h.q_stride),
                    "window_positional_embedding_background_size": list(h.window_pos_embed_bkg_spatial_size),
                    "num_query_pool_stages": h.q_pool,
                    "blocks_per_stage": list(h.stages),
                    "embed_dim_per_stage": list(h.embed_dims),
                    "num_attention_heads_per_stage": list(h.num_heads),
                    "window_size_per_stage": list(h.window_spec),
                    "global_attention_blocks": list(h.global_att_blocks),
                    "mlp_ratio": h.mlp_ratio,
                    "hidden_act": "gelu",
                    "layer_norm_eps": h.layer_norm_eps,
                },
                "backbone_channel_list": list(reversed(h.embed_dims)),
                "backbone_feature_sizes": [[s, s] for s in self.feature_sizes],
                "fpn_hidden_size": self.d_model,
                "fpn_kernel_size": 1,
                "fpn_stride": 1,
                "fpn_padding": 0,
                "fpn_top_down_levels": list(self.fpn_top_down_levels),
                "num_feature_levels": 3,
            },
            "prompt_encoder_config": {
                "model_type": "sam2_prompt_encoder",
                "hidden_size": self.d_model,
                "image_size": self.image_size,
                "patch_size": self.backbone_stride,
                "mask_input_channels": self.mask_in_chans,
                "num_point_embeddings": 4,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-6,
            },
            "mask_decoder_config": {
                "model_type": "sam2_mask_decoder",
                "hidden_size": self.d_model,
                "mlp_dim": d.mlp_dim,
                "num_hidden_layers": d.depth,
                "num_attention_heads": d.num_heads,
                "attention_downsample_rate": d.attention_downsample_rate,
                "num_multimask_outputs": d.num_multimask_outputs,
                "iou_head_depth": d.iou_head_depth,
                "iou_head_hidden_dim": d.iou_head_hidden_dim,
                "dynamic_multimask_via_stability": d.dynamic_multimask_via_stability,
                "dynamic_multimask_stability_delta": d.dynamic_multimask_stability_delta,
                "dynamic_multimask_stability_thresh": d.dynamic_multimask_stability_thresh,
            },
        }


def _hiera_from_hf(b: dict[str, Any]) -> HieraConfig:
    at = "vision_config.backbone_config."
    known(b, at, HIERA_KEYS)
    require(b, "hidden_act", "gelu", at)
    t = HieraConfig()
    hiera = HieraConfig(
        embed_dims=wholes(b, "embed_dim_per_stage", t.embed_dims, at),
        num_heads=wholes(b, "num_attention_heads_per_stage", t.num_heads, at),
        stages=wholes(b, "blocks_per_stage", t.stages, at),
        global_att_blocks=wholes(b, "global_attention_blocks", t.global_att_blocks, at, low=0, empty=True),
        window_spec=wholes(b, "window_size_per_stage", t.window_spec, at),
        window_pos_embed_bkg_spatial_size=pair(b, "window_positional_embedding_background_size", (7, 7), at),
        q_pool=whole(b, "num_query_pool_stages", 3, at),
        q_stride=pair(b, "query_stride", (2, 2), at),
        mlp_ratio=positive(b, "mlp_ratio", 4.0, at),
        patch_kernel_size=pair(b, "patch_kernel_size", (7, 7), at),
        patch_stride=pair(b, "patch_stride", (4, 4), at),
        patch_padding=pair(b, "patch_padding", (3, 3), at, low=0),
        in_channels=whole(b, "num_channels", 3, at),
        layer_norm_eps=positive(b, "layer_norm_eps", 1e-6, at),
    )
    # transformers' Hiera reads its widths from embed_dim_per_stage too; hidden_size must agree.
    same(b, "hidden_size", hiera.embed_dims[0], at, "embed_dim_per_stage[0]")
    return hiera


def _decoder_from_hf(m: dict[str, Any]) -> MaskDecoderConfig:
    at = "mask_decoder_config."
    known(m, at, DECODER_KEYS)
    depth = whole(m, "num_hidden_layers", 2, at)
    if depth > 2:
        # transformers builds each block's MLP with num_hidden_layers layers; the original always has two.
        raise ValueError(
            f"{at}num_hidden_layers = {depth}: transformers then gives each two-way block a {depth}-layer MLP, "
            "which the original SAM 2 never has; gdino reads 1 or 2"
        )
    iou_depth = whole(m, "iou_head_depth", 3, at, low=2)  # transformers' MLP has two layers at least
    return MaskDecoderConfig(
        depth=depth,
        num_heads=whole(m, "num_attention_heads", 8, at),
        mlp_dim=whole(m, "mlp_dim", 2048, at),
        attention_downsample_rate=whole(m, "attention_downsample_rate", 2, at),
        num_multimask_outputs=whole(m, "num_multimask_outputs", 3, at),
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=whole(m, "iou_head_hidden_dim", 256, at),
        dynamic_multimask_via_stability=flag(m, "dynamic_multimask_via_stability", True, at),
        dynamic_multimask_stability_delta=positive(m, "dynamic_multimask_stability_delta", 0.05, at),
        dynamic_multimask_stability_thresh=positive(m, "dynamic_multimask_stability_thresh", 0.98, at),
    )


def _check_vision(v: dict[str, Any], config: Sam2Config) -> None:
    at = "vision_config."
    known(v, at, VISION_KEYS)
    for key, value in (("fpn_kernel_size", 1), ("fpn_stride", 1), ("fpn_padding", 0), ("num_feature_levels", 3)):
        require(v, key, value, at)
    channels = list(reversed(config.hiera.embed_dims))
    same(v, "backbone_channel_list", channels, at, "backbone_config.embed_dim_per_stage, reversed")
    sizes = [[s, s] for s in config.feature_sizes]
    same(v, "backbone_feature_sizes", sizes, at, "image_size / (4, 8, 16)")


def _check_prompt_encoder(p: dict[str, Any], config: Sam2Config) -> None:
    at = "prompt_encoder_config."
    known(p, at, PROMPT_KEYS)
    for key, value in (("num_point_embeddings", 4), ("hidden_act", "gelu"), ("layer_norm_eps", 1e-6)):
        require(p, key, value, at)
    same(p, "hidden_size", config.d_model, at, "vision_config.fpn_hidden_size")
    same(p, "patch_size", config.backbone_stride, at, "the backbone's stride (patch_stride x query_stride^2)")
