"""Model configuration: frozen dataclasses, read from the published ``config.json``.

``GroundingDinoConfig.tiny()`` is the published *grounding-dino-tiny* architecture (Swin-T,
BERT-base), the one ``gdino.utils.hub.DEFAULT_MODEL_ID`` names on the Hugging Face Hub;
``GroundingDinoConfig.shapes()`` is the small model trained from scratch on the synthetic shapes
data (``gdino.training.shapes``).
``GroundingDinoConfig.from_hf_dict`` reads the Hugging Face ``config.json`` layout.
"""

from __future__ import annotations

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
        """Reads a Hugging Face ``config.json`` (model_type ``grounding-dino``)."""
        _require(d, "two_stage", True)
        _require(d, "embedding_init_target", True)
        _require(d, "decoder_bbox_embed_share", True)
        _require(d, "two_stage_bbox_embed_share", False)
        _require(d, "position_embedding_type", "sine")
        _require(d, "activation_function", "relu")
        _require(d, "query_dim", 4)
        return cls(
            swin=_swin_from_hf(d.get("backbone_config") or {}),
            text=_bert_from_hf(d.get("text_config") or {}),
            d_model=d.get("d_model", 256),
            num_feature_levels=d.get("num_feature_levels", 4),
            num_queries=d.get("num_queries", 900),
            max_text_len=d.get("max_text_len", 256),
            encoder_layers=d.get("encoder_layers", 6),
            encoder_ffn_dim=d.get("encoder_ffn_dim", 2048),
            encoder_heads=d.get("encoder_attention_heads", 8),
            encoder_points=d.get("encoder_n_points", 4),
            decoder_layers=d.get("decoder_layers", 6),
            decoder_ffn_dim=d.get("decoder_ffn_dim", 2048),
            decoder_heads=d.get("decoder_attention_heads", 8),
            decoder_points=d.get("decoder_n_points", 4),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            position_temperature=float(d.get("positional_embedding_temperature", 20)),
            **{k: type(v)(d[k]) for k, v in _training_defaults().items() if k in d},
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` for this configuration (inverse of ``from_hf_dict``)."""
        s, t = self.swin, self.text
        return {
            "model_type": "grounding-dino",
            "architectures": ["GroundingDinoForObjectDetection"],
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
            "decoder_bbox_embed_share": True,
            "two_stage_bbox_embed_share": False,
            "position_embedding_type": "sine",
            "activation_function": "relu",
            "query_dim": 4,
            **{k: getattr(self, k) for k in _training_defaults()},
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


def _training_defaults() -> dict[str, Any]:
    """The training settings (matching costs, loss weights) with their defaults."""
    names = (
        "auxiliary_loss",
        "class_cost",
        "bbox_cost",
        "giou_cost",
        "class_loss_coefficient",
        "bbox_loss_coefficient",
        "giou_loss_coefficient",
        "focal_alpha",
    )
    defaults = GroundingDinoConfig()
    return {name: getattr(defaults, name) for name in names}


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
    out_indices = tuple(i - 1 for i in b.get("out_indices", (2, 3, 4)))
    return SwinConfig(
        embed_dim=b.get("embed_dim", 96),
        depths=tuple(b.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(b.get("num_heads", (3, 6, 12, 24))),
        window_size=b.get("window_size", 7),
        mlp_ratio=float(b.get("mlp_ratio", 4.0)),
        patch_size=b.get("patch_size", 4),
        in_channels=b.get("num_channels", 3),
        out_indices=out_indices,
        layer_norm_eps=b.get("layer_norm_eps", 1e-5),
    )


def _bert_from_hf(t: dict[str, Any]) -> BertConfig:
    """The ``text_config`` of a Hugging Face ``config.json``."""
    return BertConfig(
        vocab_size=t.get("vocab_size", 30522),
        hidden_size=t.get("hidden_size", 768),
        num_layers=t.get("num_hidden_layers", 12),
        num_heads=t.get("num_attention_heads", 12),
        intermediate_size=t.get("intermediate_size", 3072),
        max_position_embeddings=t.get("max_position_embeddings", 512),
        type_vocab_size=t.get("type_vocab_size", 2),
        layer_norm_eps=t.get("layer_norm_eps", 1e-12),
        pad_token_id=t.get("pad_token_id", 0) or 0,
    )


def _int_if_whole(value: float) -> float | int:
    """20.0 -> 20: transformers' config validates some numbers as int."""
    return int(value) if float(value).is_integer() else value
