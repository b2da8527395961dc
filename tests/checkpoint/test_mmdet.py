"""mmdetection's layout (MM-Grounding-DINO and LLMDet .pth files): names both ways, the architecture
read from the tensors, and transformers' outputs from a file written in that layout.

transformers' implementation, small and seeded, is the reference: its weights go to our names
(``hf_to_ours``), then to mmdetection's (``ours_to_mmdet``) and back (``mmdet_to_ours``). The small
configuration keeps the published head counts (8 transformer heads, 64 channels per BERT head),
which the shapes cannot tell and ``mmdet_config`` assumes. The patch-merging channel reorder is
checked on its own against ``nn.Unfold``, as mmdetection gathers the neighbourhoods.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gdino.checkpoint.convert import ConversionError, StateDict, hf_to_ours
from gdino.checkpoint.convert_mmdet import (
    concat_to_unfold,
    looks_mmdet,
    mmdet_config,
    mmdet_state_dict,
    mmdet_to_ours,
    ours_to_mmdet,
    unfold_to_concat,
)
from gdino.checkpoint.loading import load_strict
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.models.grounding_dino.model import GroundingDino
from reference import DATA, as_mm_config, build_reference, reference_processor, small_reference_config

TOP = 20
PROMPT = "a cat. a remote control."
KINDS = {"mm-shared": True, "mm-unshared": False, "grounding-dino": True}  # kind -> decoder heads shared


def _reference_config(kind: str) -> Any:
    """A small transformers config with the published head counts (8 heads, 64 channels per BERT head)."""
    base = small_reference_config(encoder_attention_heads=8, decoder_attention_heads=8)
    base.text_config.num_attention_heads = 1  # 64 wide
    if kind == "grounding-dino":  # mmdetection's port of the original: a class head without parameters
        return base
    return as_mm_config(base, share=KINDS[kind])


Case = tuple[str, Any, StateDict, StateDict]  # Any: transformers' model


@functools.cache
def _case(kind: str) -> Case:
    """(kind, transformers' model, its weights under our names, the same in mmdetection's layout), built once."""
    with torch.no_grad():
        reference = build_reference(_reference_config(kind), seed=7)
    share = KINDS[kind]
    ours, unknown = hf_to_ours(reference.state_dict(), share, share)
    assert unknown == []
    return kind, reference, ours, ours_to_mmdet(ours, reference.config.decoder_layers)


@pytest.fixture(scope="module", params=list(KINDS))
def case(request: pytest.FixtureRequest) -> Case:
    return _case(request.param)


def test_mmdet_layout_round_trips_bit_for_bit(case: Case) -> None:
    kind, reference, ours, mm = case
    layers = reference.config.decoder_layers
    back, unknown = mmdet_to_ours(mm, KINDS[kind], KINDS[kind])
    assert unknown == []
    assert set(back) == set(ours), set(back) ^ set(ours)
    for name, t in ours.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    # the file is in mmdetection's layout: its names, one branch per decoder layer and one for the encoder
    assert looks_mmdet(mm) and not looks_mmdet(ours) and not looks_mmdet(reference.state_dict())
    d = reference.config.d_model
    expected = {
        "backbone.stages.0.blocks.0.attn.w_msa.qkv.weight": (96, 32),  # packed [q; k; v]
        "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index": (49, 49),
        "backbone.stages.0.downsample.reduction.weight": (64, 128),
        "backbone.norm1.weight": (64,),  # the 0-based stage, no shift
        "neck.convs.2.gn.weight": (d,),
        "neck.extra_convs.0.conv.weight": (d, 256, 3, 3),  # after the three 1x1 convs
        "encoder.text_layers.0.self_attn.attn.in_proj_weight": (3 * d, d),
        "decoder.layers.1.cross_attn_text.attn.in_proj_bias": (3 * d,),
        "decoder.layers.1.norms.3.weight": (d,),
        f"bbox_head.reg_branches.{layers}.4.weight": (4, d),  # the encoder's proposal head
        "language_model.language_backbone.body.model.embeddings.position_ids": (1, 512),
        "memory_trans_fc.weight": (d, d),
        "query_embedding.weight": (reference.config.num_queries, d),
    }
    if kind != "grounding-dino":
        expected |= {f"bbox_head.cls_branches.{n}.bias": (1,) for n in range(layers + 1)}
    else:
        assert not any(".cls_branches." in name for name in mm)
    for name, shape in expected.items():
        assert tuple(mm[name].shape) == shape, name
    assert {n for n in range(layers + 2) if f"bbox_head.reg_branches.{n}.0.weight" in mm} == set(range(layers + 1))


def test_architecture_is_read_from_the_tensors(case: Case) -> None:
    kind, reference, _, mm = case
    expected = GroundingDinoConfig.from_hf_dict(json.loads(reference.config.to_json_string()))
    assert mmdet_config(mm) == expected
    assert (expected.model_type, expected.share_box_heads) == (
        "grounding-dino" if kind == "grounding-dino" else "mm-grounding-dino",
        KINDS[kind],
    )


def test_each_head_kind_is_shared_only_when_its_branches_are_equal() -> None:
    _, _, _, mm = _case("mm-shared")
    edited = dict(mm)
    edited["bbox_head.reg_branches.1.2.bias"] = mm["bbox_head.reg_branches.1.2.bias"] + 1
    config = mmdet_config(edited)
    assert (config.share_box_heads, config.share_class_heads) == (False, True)
    with pytest.raises(ConversionError, match=r"bbox_head\.reg_branches\.1\.2\.bias"):
        mmdet_to_ours(edited, True, True)
    ours, unknown = mmdet_to_ours(edited, False, True)
    assert unknown == [] and "bbox_embed.1.layers.1.bias" in ours and "class_embed.bias" in ours


def test_mmdet_file_gives_transformers_outputs(case: Case, tmp_path: Path) -> None:
    """A .pth in mmdetection's layout builds and loads strictly, and gives transformers' outputs
    (both decoding the image tokens transformers selected: near-ties may rank either way elsewhere)."""
    kind, reference, _, mm = case
    path = tmp_path / f"{kind}.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mm}, path)
    sd = mmdet_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    config = mmdet_config(sd)
    weights, unknown = mmdet_to_ours(sd, config.share_box_heads, config.share_class_heads)
    assert unknown == []
    model = GroundingDino(config).eval()
    load_strict(model, weights, str(path))

    processor = reference_processor()
    processor.image_processor.size = {"shortest_edge": 160, "longest_edge": 256}
    inputs = processor(images=Image.open(DATA / "chelsea.png").convert("RGB"), text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = reference(**inputs)
        index = ref.enc_outputs_class.max(-1).values.topk(config.num_queries, dim=1).indices
        out = model(**inputs, query_index=index)
    assert torch.equal(out.query_index, index)
    tokens = inputs["input_ids"].shape[1]
    top = ref.logits[0, :, :tokens].max(-1).values.topk(TOP).indices
    box_err = (ref.pred_boxes[0, top] - out.pred_boxes[0, top]).abs().max().item()
    logit_err = (ref.logits[0, top, :tokens] - out.logits[0, top, :tokens]).abs().max().item()
    assert box_err < 1e-4, f"boxes differ by {box_err}"
    assert logit_err < 1e-3, f"logits differ by {logit_err}"


def test_patch_merging_reorder_matches_unfold() -> None:
    """mmdetection merges patches with nn.Unfold(2, stride 2), then norm and reduction; ours, given the
    reordered weights, computes the same."""
    from gdino.models.grounding_dino.swin import PatchMerging

    g = torch.Generator().manual_seed(0)
    c = 6
    x = torch.randn(2, 4, 6, c, generator=g)  # (B, H, W, C)
    norm_w, norm_b = 1 + torch.randn(4 * c, generator=g), torch.randn(4 * c, generator=g)
    reduction = torch.randn(2 * c, 4 * c, generator=g)  # mmdetection's order: channel 4c + 2row + col
    unfolded = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, 4C)
    expected = F.layer_norm(unfolded, (4 * c,), norm_w, norm_b) @ reduction.T  # (B, L, 2C)

    ours = PatchMerging(c)
    load_strict(
        ours,
        {
            "norm.weight": unfold_to_concat(norm_w),
            "norm.bias": unfold_to_concat(norm_b),
            "reduction.weight": unfold_to_concat(reduction),
        },
    )
    with torch.no_grad():
        got = ours(x).flatten(1, 2)  # (B, H/2 * W/2, 2C)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(concat_to_unfold(unfold_to_concat(reduction)), reduction)
    assert not torch.equal(unfold_to_concat(reduction), reduction)


def test_unused_names_are_dropped_and_others_reported() -> None:
    _, reference, ours, mm = _case("mm-unshared")
    extra = {
        "dn_query_generator.label_embedding.weight": torch.zeros(256, reference.config.d_model),
        "lmm.model.layers.0.mlp.weight": torch.zeros(2),  # LLMDet's training-only language model
        "connector.0.weight": torch.zeros(2),
        "language_model.language_backbone.body.model.pooler.dense.weight": torch.zeros(2),
        "mystery.weight": torch.zeros(2),
        "bbox_head.cls_branches.0.log_scale": torch.zeros(1),
    }
    back, unknown = mmdet_to_ours({**{"module." + k: v for k, v in mm.items()}, **extra}, False, False)
    assert sorted(unknown) == ["bbox_head.cls_branches.0.log_scale", "mystery.weight"]
    assert set(back) == set(ours)
    with pytest.raises(ValueError, match="log_scale"):
        mmdet_config({**mm, "bbox_head.cls_branches.0.log_scale": torch.zeros(1)})


def test_other_checkpoints_are_refused_with_what_they_hold() -> None:
    _, reference, _, _ = _case("mm-shared")
    sam = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(8, 3, 16, 16),
        "prompt_encoder.point_embeddings.0.weight": torch.zeros(1, 8),
        "mask_decoder.iou_token.weight": torch.zeros(1, 8),
    }
    with pytest.raises(ValueError, match="Segment Anything") as err:
        mmdet_config(sam)
    assert "image_encoder." in str(err.value) and "backbone.patch_embed.projection.weight" in str(err.value)
    with pytest.raises(ValueError, match="Hugging Face"):
        mmdet_config(reference.state_dict())
    with pytest.raises(ValueError, match="no state dict"):
        mmdet_state_dict({"meta": {}, "state_dict": [1, 2]})
    assert not looks_mmdet(sam)
