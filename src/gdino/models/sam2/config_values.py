"""Reading ``config.json`` values: typed and range-checked, each error naming its key.

The key sets say what each section of transformers' ``Sam2Config`` (and ``Sam2VideoConfig``) may
hold; anything else is refused, so a misspelt or unknown setting is never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any


def _names(text: str) -> frozenset[str]:
    """A set of config keys written as one space-separated string."""
    return frozenset(text.split())


# Keys every transformers config carries (both 4.x and 5.x spell them so); none changes the model.
GENERIC = _names(
    "_name_or_path _attn_implementation_autoset add_cross_attention architectures bad_words_ids "
    "begin_suppress_tokens bos_token_id chunk_size_feed_forward cross_attention_hidden_size "
    "decoder_start_token_id diversity_penalty do_sample dtype early_stopping encoder_no_repeat_ngram_size "
    "eos_token_id exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id "
    "id2label initializer_range is_decoder is_encoder_decoder label2id length_penalty max_length min_length "
    "model_type no_repeat_ngram_size num_beam_groups num_beams num_return_sequences output_attentions "
    "output_hidden_states output_scores pad_token_id prefix problem_type pruned_heads remove_invalid_values "
    "repetition_penalty return_dict return_dict_in_generate sep_token_id suppress_tokens task_specific_params "
    "temperature tf_legacy_loss tie_encoder_decoder tie_word_embeddings tokenizer_class top_k top_p "
    "torch_dtype torchscript transformers_version typical_p use_bfloat16"
)
# Sam2VideoConfig's top-level settings (memory attention, memory encoder, object pointers): video only.
VIDEO_PREFIXES = ("memory_", "mask_downsampler_", "multimask_", "sigmoid_", "enable_", "max_", "rope_")
VIDEO_KEYS = frozenset({"num_maskmem", "fill_hole_area", "non_overlap_masks"})
# What each section of a Sam2Config may hold. transformers' Hiera reads nothing from
# num_attention_heads (its base+ and large configs keep the default 1); the prompt encoder's
# scale only sets the random init of the position matrix, which the file holds.
HIERA_KEYS = _names(
    "hidden_size num_attention_heads num_channels image_size patch_kernel_size patch_stride patch_padding "
    "query_stride window_positional_embedding_background_size num_query_pool_stages blocks_per_stage "
    "embed_dim_per_stage num_attention_heads_per_stage window_size_per_stage global_attention_blocks mlp_ratio "
    "hidden_act layer_norm_eps"
)
VISION_KEYS = _names(
    "backbone_config backbone_channel_list backbone_feature_sizes fpn_hidden_size fpn_kernel_size fpn_stride "
    "fpn_padding fpn_top_down_levels num_feature_levels hidden_act layer_norm_eps"
)
PROMPT_KEYS = _names(
    "hidden_size image_size patch_size mask_input_channels num_point_embeddings hidden_act layer_norm_eps scale"
)
DECODER_KEYS = _names(
    "hidden_size hidden_act mlp_dim num_hidden_layers num_attention_heads attention_downsample_rate "
    "num_multimask_outputs iou_head_depth iou_head_hidden_dim dynamic_multimask_via_stability "
    "dynamic_multimask_stability_delta dynamic_multimask_stability_thresh"
)


def known(d: dict[str, Any], at: str, keys: AbstractSet[str], video: bool = False) -> None:
    """Refuses keys that are neither ``keys`` nor generic (nor, for ``video``, Sam2VideoConfig's)."""

    def fits(k: str) -> bool:
        return k in keys or k in GENERIC or (video and (k in VIDEO_KEYS or k.startswith(VIDEO_PREFIXES)))

    unknown = sorted(k for k in d if not fits(k))
    if unknown:
        raise ValueError(
            f"config.json has {', '.join(at + k for k in unknown)}, which SAM 2's image model does not know"
        )


def section(d: dict[str, Any], key: str, at: str = "") -> dict[str, Any]:
    value = d.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{at}{key} must be an object, got {type(value).__name__}")
    return value


def whole(d: dict[str, Any], key: str, default: int, at: str, low: int = 1) -> int:
    value = d.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{at}{key} must be a whole number >= {low}, got {value!r}")
    return value


def wholes(
    d: dict[str, Any], key: str, default: tuple[int, ...], at: str, low: int = 1, empty: bool = False
) -> tuple[int, ...]:
    value = d.get(key, default)
    if value is None and empty:
        return ()
    if not isinstance(value, (list, tuple)) or (not value and not empty):
        raise ValueError(f"{at}{key} must be a list of whole numbers, got {value!r}")
    return tuple(whole({key: v}, key, 0, at, low) for v in value)


def pair(d: dict[str, Any], key: str, default: tuple[int, int], at: str, low: int = 1) -> tuple[int, int]:
    """An int or a list of two ints (transformers accepts both)."""
    value = d.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value, value]
    found = wholes({key: value}, key, default, at, low)
    if len(found) != 2:
        raise ValueError(f"{at}{key} must be one number or two, got {value!r}")
    return found[0], found[1]


def positive(d: dict[str, Any], key: str, default: float, at: str) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{at}{key} must be a positive number, got {value!r}")
    return float(value)


def flag(d: dict[str, Any], key: str, default: bool, at: str) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{at}{key} must be true or false, got {value!r}")
    return value


def require(d: dict[str, Any], key: str, value: Any, at: str) -> None:
    if key in d and d[key] != value:
        raise ValueError(f"config.json has {at}{key} = {d[key]!r}; every SAM 2.1 checkpoint has {value!r}")


def same(d: dict[str, Any], key: str, expected: Any, at: str, source: str) -> None:
    """``d[key]``, when present, must equal what ``source`` gives."""
    if key in d and d[key] != expected:
        raise ValueError(f"config.json has {at}{key} = {d[key]!r}, but {source} gives {expected!r}")
