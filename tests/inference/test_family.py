"""The model family beyond grounding-dino-tiny: grounding-dino-base (Swin-B, window 12),
MM-Grounding-DINO and LLMDet (scaled contrastive heads with a learnt bias, shared or per-layer
heads, Swin-L with five feature levels), each against transformers' implementation
(``GroundingDinoForObjectDetection``, ``MMGroundingDinoForObjectDetection``) through the model
card's snippet.

Seeded random weights, saved by transformers in the Hugging Face layout. Both sides decode the
image tokens transformers selected (``query_index``): near-tied proposal scores may rank either
way under another CPU's rounding. The small configurations keep each family's structure (window
size, levels, heads) at CI size; one full-size architecture per family is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reference import DATA, as_mm_config, build_reference, reference_processor, save_reference, small_reference_config

TOP = 100
PROMPT = [["a cat", "a remote control", "a sofa"]]  # the model card's text_labels
SWIN_B = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12, "image_size": 384}
SWIN_L = {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12, "image_size": 384}
FIVE_LEVELS = {"out_indices": [1, 2, 3, 4], "out_features": ["stage1", "stage2", "stage3", "stage4"]}


def _small(kind: str):
    """The small configuration of each family member."""
    window12 = {"window_size": 12, "image_size": 384}
    if kind == "base":
        return small_reference_config(backbone=window12)
    if kind == "mm-shared":
        return as_mm_config(small_reference_config(), share=True)
    if kind == "mm-unshared":
        return as_mm_config(small_reference_config(), share=False)
    if kind == "mm-large":  # LLMDet / MM-GDINO large: Swin window 12, four Swin outputs, five levels
        return as_mm_config(small_reference_config(backbone={**window12, **FIVE_LEVELS}, num_feature_levels=5), False)
    raise ValueError(kind)


def _full(kind: str):
    """The published architectures (random weights): their config.json's settings."""
    from transformers import GroundingDinoConfig, SwinConfig

    if kind == "base":  # IDEA-Research/grounding-dino-base
        return GroundingDinoConfig(backbone_config=SwinConfig(**SWIN_B, out_features=["stage2", "stage3", "stage4"]))
    if kind == "mm-tiny":  # openmmlab-community/mm_grounding_dino_tiny_*, with one head per decoder layer
        return as_mm_config(GroundingDinoConfig(), share=False)
    if kind == "llmdet-large":  # LLMDet / MM-GDINO large: Swin-L, five feature levels
        return as_mm_config(
            GroundingDinoConfig(backbone_config=SwinConfig(**SWIN_L, **FIVE_LEVELS), num_feature_levels=5), share=False
        )
    raise ValueError(kind)


def _saved(reference, directory: Path, shortest_edge: int, longest_edge: int) -> Path:
    """The reference in the Hugging Face layout, its processor resizing to the given edges."""
    save_reference(reference, directory)
    path = directory / "preprocessor_config.json"
    if not path.exists():
        path = directory / "processor_config.json"
    config = json.loads(path.read_text())
    settings = config.get("image_processor", config)
    settings["size"] = {"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    path.write_text(json.dumps(config))
    return directory


def check_against_reference(reference, directory: Path) -> None:
    """The model card's snippet with gdino's classes gives transformers' outputs."""
    from gdino import AutoModelForZeroShotObjectDetection, AutoProcessor

    image = Image.open(DATA / "chelsea.png").convert("RGB")
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(directory)
    assert model.config.model_type == reference.config.model_type
    inputs = processor(images=image, text=PROMPT, return_tensors="pt")
    theirs_processor = reference_processor()
    settings = processor.image_settings
    theirs_processor.image_processor.size = {
        "shortest_edge": settings.shortest_edge,
        "longest_edge": settings.longest_edge,
    }
    ref_inputs = theirs_processor(images=image, text=PROMPT, return_tensors="pt")
    assert torch.equal(inputs["input_ids"], ref_inputs["input_ids"])
    assert (inputs["pixel_values"] - ref_inputs["pixel_values"]).abs().max() < 1e-5
    with torch.no_grad():
        ref = reference(**ref_inputs)
        queries = ref.logits.shape[1]
        index = ref.enc_outputs_class.max(-1).values.topk(queries, dim=1).indices
        ours = model(**inputs, query_index=index)
    tokens = int(inputs["attention_mask"].sum())
    top = ref.logits[0, :, :tokens].max(-1).values.topk(min(TOP, queries)).indices
    box_err = (ref.pred_boxes[0, top] - ours.pred_boxes[0, top]).abs().max().item()
    logit_err = (ref.logits[0, top, :tokens] - ours.logits[0, top, :tokens]).abs().max().item()
    assert box_err < 1e-4, f"boxes differ by {box_err}"
    assert logit_err < 1e-3, f"logits differ by {logit_err}"
    # post-processed as the card does: the same labels, where no token probability sits on the threshold
    size = [(image.height, image.width)]
    args = {"threshold": 0.3, "text_threshold": 0.25, "target_sizes": size}
    a = processor.post_process_grounded_object_detection(ours, inputs["input_ids"], **args)[0]
    b = theirs_processor.post_process_grounded_object_detection(ref, ref_inputs["input_ids"], **args)[0]
    probs = ref.logits[0, :, :tokens].sigmoid()
    on_edge = bool(((probs - 0.25).abs() < 1e-3).any() or ((probs.max(-1).values - 0.3).abs() < 1e-3).any())
    if not on_edge:
        assert a["text_labels"] == b["text_labels"]
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-2, rtol=0)


@pytest.mark.parametrize("kind", ["base", "mm-shared", "mm-unshared", "mm-large"])
def test_small_family_members_match_transformers(kind, tmp_path) -> None:
    reference = build_reference(_small(kind), seed=3)
    check_against_reference(reference, _saved(reference, tmp_path / kind, 160, 256))


def test_mm_config_and_heads_are_read(tmp_path) -> None:
    """What the config says is what is built: one head per layer or one shared, a bias in each."""
    from gdino import GroundingDinoForObjectDetection

    for share in (True, False):
        reference = build_reference(as_mm_config(small_reference_config(), share=share), seed=4)
        model = GroundingDinoForObjectDetection.from_pretrained(_saved(reference, tmp_path / str(share), 160, 256))
        config = model.config
        assert (config.model_type, config.share_box_heads, config.share_class_heads) == (
            "mm-grounding-dino",
            share,
            share,
        )
        names = set(model.state_dict())
        per_layer = {"bbox_embed.1.layers.0.weight", "class_embed.1.bias"}
        assert (per_layer <= names) == (not share)
        assert ("class_embed.bias" in names) == share and "transformer.enc_out_class_embed.bias" in names
        saved = config.to_hf_dict()
        assert saved["model_type"] == "mm-grounding-dino" and saved["decoder_cls_embed_share"] is share


@pytest.mark.slow  # three full-size architectures, each built by both implementations
@pytest.mark.parametrize("kind", ["base", "mm-tiny", "llmdet-large"])
def test_published_architectures_match_transformers(kind, tmp_path) -> None:
    reference = build_reference(_full(kind), seed=5)
    check_against_reference(reference, _saved(reference, tmp_path / kind, 320, 480))
