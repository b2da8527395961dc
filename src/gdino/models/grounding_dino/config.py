"""Model configuration: frozen dataclasses, read from the published ``config.json``.

``GroundingDinoConfig.tiny()`` is the published *grounding-dino-tiny* architecture (Swin-T,
BERT-base), the one ``gdino.utils.hub.DEFAULT_MODEL_ID`` names on the Hugging Face Hub;
``GroundingDinoConfig.shapes()`` is the small model trained from scratch on the synthetic shapes
data (``gdino.training.shapes``).
``GroundingDinoConfig.from_hf_dict`` reads the Hugging Face ``config.json`` layout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# The two ways of taking a reference box's logit in box refinement. "original": the original
# repository's ``inverse_sigmoid(x, eps=1e-3)``, with which the published weights were trained
# (loading an original .pth chooses it); "transformers": ``torch.special.logit(x, eps=1e-5)``, as
# transformers' port computes it (loading the Hugging Face layout chooses it).
BOX_REFINEMENTS: dict[str, dict[str, Any]] = {
    "original": {"box_logit_eps": 1e-3, "box_logit_original": True},
    "transformers": {"box_logit_eps": 1e-5, "box_logit_original": False},
}

GROUNDING_DINO = "grounding-dino"
MM_GROUNDING_DINO = "mm-grounding-dino"
MODEL_TYPES = (GROUNDING_DINO, MM_GROUNDING_DINO)

# Token ids that split a prompt into phrases: [CLS], [SEP], "." and "?" (BERT-uncased vocabulary).
SPECIAL_TOKEN_IDS: tuple[int, ...] = (101, 102, 1012, 1029)


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer image backbone."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4
    in_channels: int = 3
    out_indices: tuple[int, ...] = (1, 2, 3)  # 0-based stages whose outputs feed the detector
    layer_norm_eps: float = 1e-5

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stage_dim(i) for i in self.out_indices)


SWIN_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12)
SWIN_L = SwinConfig(
    embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, out_indices=(0, 1, 2, 3)
)


@dataclass(frozen=True)
class BertConfig:
    """BERT text encoder."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


@dataclass(frozen=True)
class GroundingDinoConfig:
    """The whole detector. Defaults are grounding-dino-tiny."""

    swin: SwinConfig = field(default_factory=SwinConfig)
    text: BertConfig = field(default_factory=BertConfig)
    d_model: int = 256
    num_feature_levels: int = 4
    num_queries: int = 900
    max_text_len: int = 256
    encoder_layers: int = 6
    encoder_ffn_dim: int = 2048
    encoder_heads: int = 8
    encoder_points: int = 4
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    decoder_heads: int = 8
    decoder_points: int = 4
    layer_norm_eps: float = 1e-5
    position_temperature: float = 20.0  # sine embedding of image positions
    special_token_ids: tuple[int, ...] = SPECIAL_TOKEN_IDS
    # Box refinement takes the logit of each reference box, clamped near 0 and 1 (see
    # ``model.heads.box_logit`` and ``BOX_REFINEMENTS``): transformers' arithmetic by default.
    box_logit_eps: float = 1e-5
    box_logit_original: bool = False
    # Training (gdino.loss.criterion): matching costs and loss weights, named as in config.json.
    auxiliary_loss: bool = False  # also a loss on every decoder layer but the last
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    class_loss_coefficient: float = 2.0  # not in transformers' config: it fixes 2.0 (the original's cls_loss_coef)
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0
    focal_alpha: float = 0.25
    # ``detect``'s thresholds when the caller gives none: the published model's 0.35 and 0.25, or
    # what a model's config.json recommends under "gdino_defaults" (the packaged gdino-shapes: 0.25).
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    # The family member's head (MM-Grounding-DINO and LLMDet, model_type "mm-grounding-dino"): its
    # contrastive class head divides the dot products by sqrt(d_model) and adds a learnt bias, and
    # each decoder layer may have its own class and box heads (decoder_cls_embed_share,
    # decoder_bbox_embed_share False). Grounding DINO's class head has no parameters.
    model_type: str = "grounding-dino"
    share_box_heads: bool = True
    share_class_heads: bool = True

    @property
    def contrastive_bias(self) -> bool:
        """Whether the class heads scale by 1/sqrt(d_model) and add a learnt bias (MM-Grounding-DINO)."""
        return self.model_type == MM_GROUNDING_DINO

    # Derived widths, named as in the paper's feature enhancer.
    @property
    def text_enhancer_ffn_dim(self) -> int:
        return self.encoder_ffn_dim // 2

    @property
    def text_enhancer_heads(self) -> int:
        return self.encoder_heads // 2

    @property
    def fusion_dim(self) -> int:
        return self.encoder_ffn_dim // 2

    @property
    def fusion_heads(self) -> int:
        return self.encoder_heads // 2

    def with_box_refinement(self, name: str) -> GroundingDinoConfig:
        """This configuration with the box refinement of ``BOX_REFINEMENTS[name]`` ("original" or "transformers")."""
        if name not in BOX_REFINEMENTS:
            raise ValueError(f"box_refinement must be one of {sorted(BOX_REFINEMENTS)}, not {name!r}")
        return replace(self, **BOX_REFINEMENTS[name])

    @classmethod
    def tiny(cls) -> GroundingDinoConfig:
        """The published grounding-dino-tiny (Swin-T + BERT-base)."""
        return cls()

    @classmethod
    def base(cls) -> GroundingDinoConfig:
        """The published grounding-dino-base: Swin-B (window 12, pretrained at 384) + BERT-base."""
        return cls(swin=SWIN_B)

    @classmethod
    def mm(cls, size: str = "tiny") -> GroundingDinoConfig:
        """MM-Grounding-DINO and LLMDet (``size`` "tiny", "base" or "large"): the scaled class head with
        a bias and one class and box head per decoder layer; large is Swin-L with five feature levels."""
        swin = {"tiny": SwinConfig(), "base": SWIN_B, "large": SWIN_L}[size]
        return cls(
            swin=swin,
            num_feature_levels=len(swin.out_indices) + 1,
            model_type=MM_GROUNDING_DINO,
            share_box_heads=False,
            share_class_heads=False,
        )

    @classmethod
    def small_test(cls) -> GroundingDinoConfig:
        """A narrow, shallow configuration that builds in milliseconds: ``gdino train --model
        config:small_test`` smoke-runs a training set-up, and tests use it around the model."""
        return cls(
            swin=SwinConfig(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4)),
            text=BertConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128),
            d_model=64,
            num_queries=50,
            encoder_layers=1,
            encoder_ffn_dim=128,
            encoder_heads=4,
            decoder_layers=2,
            decoder_ffn_dim=128,
            decoder_heads=4,
        )

    @classmethod
    def shapes(cls) -> GroundingDinoConfig:
        """The shapes model: small enough to train from scratch on 2 CPU cores at a short side of 256.

        The same family as ``tiny`` (Swin, BERT on the BERT-base-uncased vocabulary, feature
        enhancer, language-guided query selection, deformable decoder, 4 feature levels), narrower
        and shallower: about 4.3M parameters, 2.0M of them BERT's word embeddings. It has two BERT
        layers, two encoder and three decoder layers and 100 queries, for a model that learns
        rather than one that merely runs; two Swin blocks in each of the first three stages, so
        that their second block's shifted windows join the first's (one block a stage only sees
        within its windows, which cut shapes apart). Trained with a loss on every decoder layer
        (``auxiliary_loss``), as the original recipe does: from scratch, the earlier layers have
        no other signal.
        """
        return cls(
            swin=SwinConfig(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8)),
            text=BertConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
            d_model=64,
            num_queries=100,
            encoder_layers=2,
            encoder_ffn_dim=256,
            encoder_heads=4,
            decoder_layers=3,
            decoder_ffn_dim=256,
            decoder_heads=4,
            auxiliary_loss=True,
        )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GroundingDinoConfig:
        """Reads a Hugging Face ``config.json`` (model_type ``grounding-dino`` or ``mm-grounding-dino``)."""
        model_type = d.get("model_type", GROUNDING_DINO)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type is {model_type!r}; gdino runs {' and '.join(repr(m) for m in MODEL_TYPES)} checkpoints "
                "(Grounding DINO, MM-Grounding-DINO, LLMDet)"
            )
        if model_type == GROUNDING_DINO:
            _require(d, "decoder_cls_embed_share", True)  # its class head has no parameters to share
        _require(d, "two_stage", True)
        _require(d, "embedding_init_target", True)
        _require(d, "two_stage_bbox_embed_share", False)
        _require(d, "position_embedding_type", "sine")
        _require(d, "activation_function", "relu")
        _require(d, "query_dim", 4)
        config = cls(
            swin=_swin_from_hf(_section(d, "backbone_config")),
            text=_bert_from_hf(_section(d, "text_config")),
            d_model=_int(d, "d_model", 256),
            num_feature_levels=_int(d, "num_feature_levels", 4),
            num_queries=_int(d, "num_queries", 900),
            max_text_len=_int(d, "max_text_len", 256, low=2),
            encoder_layers=_int(d, "encoder_layers", 6),
            encoder_ffn_dim=_int(d, "encoder_ffn_dim", 2048),
            encoder_heads=_int(d, "encoder_attention_heads", 8),
            encoder_points=_int(d, "encoder_n_points", 4),
            decoder_layers=_int(d, "decoder_layers", 6),
            decoder_ffn_dim=_int(d, "decoder_ffn_dim", 2048),
            decoder_heads=_int(d, "decoder_attention_heads", 8),
            decoder_points=_int(d, "decoder_n_points", 4),
            layer_norm_eps=_float(d, "layer_norm_eps", 1e-5),
            position_temperature=_float(d, "positional_embedding_temperature", 20.0),
            **{k: _training_value(d, k, v) for k, v in _training_defaults().items() if k in d},
        )
        defaults = _detection_defaults(_section(d, "gdino_defaults"))
        config = replace(
            config,
            model_type=model_type,
            share_box_heads=_flag(d, "decoder_bbox_embed_share", True),
            share_class_heads=_flag(d, "decoder_cls_embed_share", True),
            box_threshold=defaults.get("box_threshold", config.box_threshold),
            text_threshold=defaults.get("text_threshold", config.text_threshold),
        )
        config.check()
        return config

    def check(self) -> None:
        """Refuses widths that cannot be split into the configured heads, and a text length the
        text encoder cannot hold; each message names the ``config.json`` keys.

        Raises:
            ValueError: the first inconsistency found.
        """
        s, t = self.swin, self.text
        pairs = [
            ("d_model", self.d_model, "encoder_attention_heads", self.encoder_heads),
            ("d_model", self.d_model, "decoder_attention_heads", self.decoder_heads),
            (
                "encoder_ffn_dim / 2 (the fusion width)",
                self.fusion_dim,
                "encoder_attention_heads / 2",
                self.fusion_heads,
            ),
            ("d_model", self.d_model, "encoder_attention_heads / 2 (the text enhancer)", self.text_enhancer_heads),
            ("text_config.hidden_size", t.hidden_size, "text_config.num_attention_heads", t.num_heads),
        ]
        pairs += [
            (f"backbone_config stage {i} width", s.stage_dim(i), f"backbone_config.num_heads[{i}]", heads)
            for i, heads in enumerate(s.num_heads)
        ]
        for width_name, width, heads_name, heads in pairs:
            if heads < 1 or width % heads:
                raise ValueError(f"{width_name} = {width} cannot be split into {heads_name} = {heads} heads")
        if len(s.depths) != len(s.num_heads):
            raise ValueError(f"backbone_config.depths has {len(s.depths)} stages but num_heads {len(s.num_heads)}")
        if any(not 0 <= i < len(s.depths) for i in s.out_indices) or len(s.out_indices) + 1 != self.num_feature_levels:
            raise ValueError(
                f"backbone_config.out_indices {[i + 1 for i in s.out_indices]} do not give num_feature_levels - 1 = "
                f"{self.num_feature_levels - 1} stages of the {len(s.depths)}"
            )
        if self.max_text_len > t.max_position_embeddings:
            raise ValueError(
                f"max_text_len = {self.max_text_len} is more tokens than the text encoder has positions for "
                f"(text_config.max_position_embeddings = {t.max_position_embeddings})"
            )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` for this configuration (inverse of ``from_hf_dict``)."""
        s, t = self.swin, self.text
        mm = self.model_type == MM_GROUNDING_DINO
        return {
            "model_type": self.model_type,
            "architectures": ["MMGroundingDinoForObjectDetection" if mm else "GroundingDinoForObjectDetection"],
            "d_model": self.d_model,
            "num_feature_levels": self.num_feature_levels,
            "num_queries": self.num_queries,
            "max_text_len": self.max_text_len,
            "encoder_layers": self.encoder_layers,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "encoder_attention_heads": self.encoder_heads,
            "encoder_n_points": self.encoder_points,
            "decoder_layers": self.decoder_layers,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "decoder_attention_heads": self.decoder_heads,
            "decoder_n_points": self.decoder_points,
            "layer_norm_eps": self.layer_norm_eps,
            "positional_embedding_temperature": _int_if_whole(self.position_temperature),
            "two_stage": True,
            "embedding_init_target": True,
            "decoder_bbox_embed_share": self.share_box_heads,
            **({"decoder_cls_embed_share": self.share_class_heads} if mm else {}),
            "two_stage_bbox_embed_share": False,
            "position_embedding_type": "sine",
            "activation_function": "relu",
            "query_dim": 4,
            **{k: getattr(self, k) for k in _training_defaults()},
            **(
                {"gdino_defaults": self.detection_defaults()}
                if self.detection_defaults() != _PUBLISHED_DEFAULTS
                else {}
            ),
            "backbone_config": {
                "model_type": "swin",
                "embed_dim": s.embed_dim,
                "depths": list(s.depths),
                "num_heads": list(s.num_heads),
                "window_size": s.window_size,
                "mlp_ratio": s.mlp_ratio,
                "patch_size": s.patch_size,
                "num_channels": s.in_channels,
                "out_indices": [i + 1 for i in s.out_indices],
                "out_features": [f"stage{i + 1}" for i in s.out_indices],
                "layer_norm_eps": s.layer_norm_eps,
            },
            "text_config": {
                "model_type": "bert",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "num_hidden_layers": t.num_layers,
                "num_attention_heads": t.num_heads,
                "intermediate_size": t.intermediate_size,
                "max_position_embeddings": t.max_position_embeddings,
                "type_vocab_size": t.type_vocab_size,
                "layer_norm_eps": t.layer_norm_eps,
                "pad_token_id": t.pad_token_id,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def detection_defaults(self) -> dict[str, float]:
        """``detect``'s default thresholds for this model: ``{"box_threshold", "text_threshold"}``."""
        return {"box_threshold": self.box_threshold, "text_threshold": self.text_threshold}


# The training settings (matching costs, loss weights): they change how weights are trained, not what they mean.
TRAINING_FIELDS = (
    "auxiliary_loss",
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "class_loss_coefficient",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "focal_alpha",
)


def _training_defaults() -> dict[str, Any]:
    """The training settings with their defaults."""
    defaults = GroundingDinoConfig()
    return {name: getattr(defaults, name) for name in TRAINING_FIELDS}


_PUBLISHED_DEFAULTS = {"box_threshold": 0.35, "text_threshold": 0.25}


def _detection_defaults(d: dict[str, Any]) -> dict[str, float]:
    """config.json's "gdino_defaults": the thresholds a model recommends, each a number in [0, 1]."""
    unknown = sorted(set(d) - set(_PUBLISHED_DEFAULTS))
    if unknown:
        raise ValueError(f"gdino_defaults has {unknown[0]!r}; it may hold {', '.join(_PUBLISHED_DEFAULTS)}")
    found = {}
    for key, value in d.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"gdino_defaults.{key} must be a number from 0 to 1, got {value!r}")
        found[key] = float(value)
    return found


def _section(d: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested config (``backbone_config``, ``text_config``); absent means the defaults."""
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


def _ints(d: dict[str, Any], key: str, default: tuple[int, ...], low: int = 1, where: str = "") -> tuple[int, ...]:
    """``d[key]`` as a non-empty list of whole numbers of at least ``low``."""
    value = d.get(key, default)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}{key} must be a list of whole numbers, got {value!r}")
    return tuple(_int({key: v}, key, 0, low, where) for v in value)


def _float(d: dict[str, Any], key: str, default: float, where: str = "") -> float:
    """``d[key]`` as a finite positive number (``default`` when absent)."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}{key} must be a positive number, got {value!r}")
    return float(value)


def _flag(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _training_value(d: dict[str, Any], key: str, default: Any) -> Any:
    """A training setting (a flag, or a non-negative weight) in ``default``'s type."""
    value = d[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a number >= 0, got {value!r}")
    return float(value)


def _require(d: dict[str, Any], key: str, value: Any) -> None:
    if key in d and d[key] != value:
        raise ValueError(
            f"config.json has {key}={d[key]!r}; gdino implements the published architecture, which has {value!r}"
        )


def _swin_from_hf(b: dict[str, Any]) -> SwinConfig:
    """The ``backbone_config`` of a Hugging Face ``config.json``."""
    if b.get("model_type", "swin") != "swin":
        raise ValueError(f"only a Swin backbone is supported, config has {b.get('model_type')!r}")
    # HF counts the stem as stage 0, so its out_indices [2, 3, 4] are our stages 1, 2, 3.
    at = "backbone_config."
    out_indices = tuple(i - 1 for i in _ints(b, "out_indices", (2, 3, 4), where=at))
    return SwinConfig(
        embed_dim=_int(b, "embed_dim", 96, where=at),
        depths=_ints(b, "depths", (2, 2, 6, 2), where=at),
        num_heads=_ints(b, "num_heads", (3, 6, 12, 24), where=at),
        window_size=_int(b, "window_size", 7, where=at),
        mlp_ratio=_float(b, "mlp_ratio", 4.0, where=at),
        patch_size=_int(b, "patch_size", 4, where=at),
        in_channels=_int(b, "num_channels", 3, where=at),
        out_indices=out_indices,
        layer_norm_eps=_float(b, "layer_norm_eps", 1e-5, where=at),
    )


def _bert_from_hf(t: dict[str, Any]) -> BertConfig:
    """The ``text_config`` of a Hugging Face ``config.json``."""
    at = "text_config."
    return BertConfig(
        vocab_size=_int(t, "vocab_size", 30522, where=at),
        hidden_size=_int(t, "hidden_size", 768, where=at),
        num_layers=_int(t, "num_hidden_layers", 12, where=at),
        num_heads=_int(t, "num_attention_heads", 12, where=at),
        intermediate_size=_int(t, "intermediate_size", 3072, where=at),
        max_position_embeddings=_int(t, "max_position_embeddings", 512, where=at),
        type_vocab_size=_int(t, "type_vocab_size", 2, where=at),
        layer_norm_eps=_float(t, "layer_norm_eps", 1e-12, where=at),
        pad_token_id=_int({"pad_token_id": t.get("pad_token_id") or 0}, "pad_token_id", 0, low=0, where=at),
    )


def _int_if_whole(value: float) -> float | int:
    """20.0 -> 20: transformers' config validates some numbers as int."""
    return int(value) if float(value).is_integer() else value
