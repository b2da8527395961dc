"""transformers' SAM 2.1, SAM and SAM-HQ snippets with only the import changed.

Small seeded random-weight models are built by transformers and saved in the Hugging Face layout;
transformers' model and ours load the same folder, and the snippet runs through both with the same
processor outputs (ours: transformers' SAM 2.1 image processor needs torchvision; that the
processors agree is tests/processing/test_sam_processing.py's part).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gdino import Sam2Model, Sam2Processor, SamHQModel, SamModel, SamProcessor

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
S2 = 64  # the SAM 2.1 model's input side
S1 = 64  # the SAM models'


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Seeded noise scaled to each parameter's fan-in, so that random weights give real masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            table = p.dim() < 2 or any(word in name for word in ("embed", "token", "pos"))
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if table else 1.1 / math.sqrt(p[0].numel())))
        shared = model.shared_image_embedding.positional_embedding
        if hasattr(model.prompt_encoder, "shared_embedding"):  # SAM 2.1 keeps a copy: make them one
            model.prompt_encoder.shared_embedding.positional_embedding.copy_(shared)


def sam2_config():
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 2, 2, 4],
        "blocks_per_stage": [1, 1, 2, 1],
        "global_attention_blocks": [3],
        "window_size_per_stage": [8, 4, 4, 4],
        "window_positional_embedding_background_size": [4, 4],
        "image_size": [S2, S2],
    }
    return transformers.Sam2Config(
        vision_config={
            "backbone_config": backbone,
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[S2 // s] * 2 for s in (4, 8, 16)],
            "fpn_hidden_size": 64,
        },
        prompt_encoder_config={"hidden_size": 64, "image_size": S2},
        mask_decoder_config={"hidden_size": 64, "mlp_dim": 128, "num_attention_heads": 4, "iou_head_hidden_dim": 64},
    )


def sam_config(hq: bool):
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": S1,
        "patch_size": 8,
        "window_size": 4,
        "global_attn_indexes": [1],
        "num_pos_feats": 16,
        "output_channels": 32,
        "mlp_dim": 48,
    }
    prompt = {"hidden_size": 32, "image_size": S1, "patch_size": 8, "mask_input_channels": 8}
    decoder = {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 8, "iou_head_hidden_dim": 32}
    cls = transformers.SamHQConfig if hq else transformers.SamConfig
    return cls(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config={**decoder, **({"vit_dim": 32} if hq else {})},
    )


FAMILIES = {
    "sam2": (sam2_config, transformers.Sam2Model, Sam2Model, Sam2Processor, {"size": {"height": S2, "width": S2}}),
    "sam": (
        lambda: sam_config(False),
        transformers.SamModel,
        SamModel,
        SamProcessor,
        {"size": {"longest_edge": S1}, "pad_size": {"height": S1, "width": S1}},
    ),
    "sam_hq": (
        lambda: sam_config(True),
        transformers.SamHQModel,
        SamHQModel,
        SamProcessor,
        {"size": {"longest_edge": S1}, "pad_size": {"height": S1, "width": S1}},
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(transformers' model, ours, our processor) on one saved folder."""
    build, their_class, our_class, processor_class, preprocessor = FAMILIES[request.param]
    torch.manual_seed(0)
    theirs = their_class(build()).eval()
    perturb_(theirs, seed=1)
    directory: Path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return theirs, our_class.from_pretrained(directory), processor_class.from_pretrained(directory)


IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 220, 3), dtype=np.uint8))  # non-square
BOXES = [[[20, 30, 120, 140], [100, 10, 210, 90], [0, 0, 220, 150]]]
POINTS = [[[[60, 70], [30, 40]], [[150, 50], [200, 20]], [[110, 75], [5, 140]]]]
LABELS = [[[1, 0], [1, 1], [1, 0]]]
PROMPTS = {
    "boxes": {"input_boxes": BOXES},
    "points": {"input_points": POINTS, "input_labels": LABELS},
    "both": {"input_boxes": BOXES, "input_points": POINTS, "input_labels": LABELS},
}


def assert_same(mine, theirs, sam2: bool) -> None:
    assert mine.pred_masks.shape == theirs.pred_masks.shape and mine.iou_scores.shape == theirs.iou_scores.shape
    assert theirs.pred_masks.abs().mean() > 0.1  # not degenerate
    assert (mine.pred_masks - theirs.pred_masks).abs().max() < ATOL
    assert (mine.iou_scores - theirs.iou_scores).abs().max() < ATOL
    if sam2:
        assert (mine.object_score_logits - theirs.object_score_logits).abs().max() < ATOL


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_the_snippet_matches_transformers(family, prompt, multimask) -> None:
    theirs, ours, processor = family
    inputs = processor(images=IMAGE, return_tensors="pt", **PROMPTS[prompt])
    with torch.no_grad():
        mine = ours(**inputs, multimask_output=multimask)
        reference = theirs(**inputs, multimask_output=multimask)
    assert mine.pred_masks.shape[:3] == (1, 3, 3 if multimask else 1)
    assert_same(mine, reference, isinstance(ours, Sam2Model))
    extra = [inputs["reshaped_input_sizes"]] if "reshaped_input_sizes" in inputs else []
    masks = processor.post_process_masks(mine.pred_masks, inputs["original_sizes"], *extra)[0]
    their_masks = processor.post_process_masks(reference.pred_masks, inputs["original_sizes"], *extra)[0]
    assert masks.shape[-2:] == (150, 220) and masks.dtype == torch.bool
    assert (masks != their_masks).float().mean() < 1e-3  # only pixels at a logit of 0 to within ATOL


def test_image_embeddings_are_reused(family) -> None:
    theirs, ours, processor = family
    inputs = processor(images=IMAGE, return_tensors="pt")
    with torch.no_grad():
        mine_embeddings = ours.get_image_embeddings(inputs["pixel_values"])
        their_embeddings = theirs.get_image_embeddings(inputs["pixel_values"])
        for prompt in ("boxes", "points"):
            scaled = processor(images=IMAGE, return_tensors="pt", **PROMPTS[prompt])
            keys = {k: v for k, v in scaled.items() if k.startswith("input_")}
            if isinstance(ours, Sam2Model) or not isinstance(mine_embeddings, tuple):
                mine = ours(image_embeddings=mine_embeddings, **keys)
                reference = theirs(image_embeddings=their_embeddings, **keys)
            else:  # SAM-HQ: (image embeddings, early ViT features), as transformers returns them
                mine = ours(image_embeddings=mine_embeddings[0], intermediate_embeddings=mine_embeddings[1], **keys)
                reference = theirs(
                    image_embeddings=their_embeddings[0], intermediate_embeddings=their_embeddings[1], **keys
                )
            assert_same(mine, reference, isinstance(ours, Sam2Model))
            direct = ours(pixel_values=scaled["pixel_values"], **keys)
            assert torch.allclose(direct.pred_masks, mine.pred_masks, atol=1e-5)


def test_bad_calls_are_refused(family) -> None:
    _, ours, processor = family
    inputs = processor(images=IMAGE, input_boxes=BOXES, return_tensors="pt")
    with pytest.raises(ValueError, match="either pixel_values or image_embeddings"):
        ours(input_boxes=inputs["input_boxes"])
    with pytest.raises(TypeError, match="unexpected arguments"):
        ours(**inputs, not_an_argument=1)
