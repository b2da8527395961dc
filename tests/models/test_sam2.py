"""SAM 2.1's image model against transformers' ``Sam2Model`` (the reference), on seeded random weights.

Random init is degenerate for a comparison (the Hiera position tables and the no-memory embedding
are zero, the linear layers tiny), so every parameter gets seeded noise scaled to its fan-in, and
transformers' two copies of the prompt position matrix are made one, as in every published file.
The weights are saved in the Hugging Face layout and loaded with ``load_sam2``; prompts are pixel
coordinates of the model's square input. transformers' image processor needs torchvision, so the
pixel values are built here.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from gdino.checkpoint.convert_sam2 import hf_to_ours, ours_to_hf, ours_to_original
from gdino.checkpoint.sam2_loading import config_from_tensors, load_sam2
from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.model import ImageEmbeddings, Sam2
from gdino.utils.hub import CheckpointError

S = 128  # the small models' input side: image embedding 8 x 8, masks 32 x 32
ATOL = 1e-4
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def small_hf_config(image_size: int = S, **decoder: object):
    """A narrow Sam2Config in transformers' terms: four stages with pooled windows, a window larger than
    its stage's map (padding), global blocks in two stages, a background table of another size."""
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 16,
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 2, 2, 4],
        "blocks_per_stage": [1, 2, 3, 2],
        "global_attention_blocks": [4, 7],
        "window_size_per_stage": [8, 4, 6, 3],
        "window_positional_embedding_background_size": [5, 5],
        "image_size": [image_size, image_size],
    }
    sizes = [[image_size // s] * 2 for s in (4, 8, 16)]
    return transformers.Sam2Config(
        vision_config={
            "backbone_config": backbone,
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": sizes,
            "fpn_hidden_size": 64,
        },
        prompt_encoder_config={"hidden_size": 64, "image_size": image_size},
        mask_decoder_config={
            "hidden_size": 64,
            "mlp_dim": 128,
            "num_attention_heads": 4,
            "iou_head_hidden_dim": 64,
            **decoder,
        },
    )


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Seeded noise on every parameter: N(0, 1 / fan_in) on matrices and kernels, N(0, 0.04) on
    vectors, tokens and position tables; then the prompt position matrix's copies made one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            table = p.dim() < 2 or any(word in name for word in ("embed", "token", "pos"))
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if table else 1 / math.sqrt(p[0].numel())))
        model.prompt_encoder.shared_embedding.positional_embedding.copy_(
            model.shared_image_embedding.positional_embedding
        )


def build_reference(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Sam2Model(config).eval()
    perturb_(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def reference():
    return build_reference(small_hf_config())


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sam2-small")
    reference.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ours(hf_dir) -> Sam2:
    return load_sam2(hf_dir)


def pixels(batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(seed))


BOXES = torch.tensor([[[10.0, 20, 90, 100], [30, 5, 120, 60]], [[0, 0, 127, 127], [50, 50, 70, 90]]])  # (2, 2, 4)
POINTS = torch.tensor(
    [
        [[[20.0, 30], [100, 90], [64, 64]], [[5, 120], [70, 10], [0, 0]]],
        [[[127, 127], [40, 80], [90, 15]], [[60, 60], [61, 61], [10, 100]]],
    ]
)  # (2, 2, 3, 2)
LABELS = torch.tensor([[[1, 0, 1], [1, 1, -1]], [[0, 1, 1], [1, 0, 0]]])  # (2, 2, 3), -1: a padding point
PROMPTS = {
    "box": ({"input_boxes": BOXES}, {"boxes": BOXES}),
    "points": ({"input_points": POINTS, "input_labels": LABELS}, {"point_coords": POINTS, "point_labels": LABELS}),
    "both": (
        {"input_points": POINTS, "input_labels": LABELS, "input_boxes": BOXES},
        {"point_coords": POINTS, "point_labels": LABELS, "boxes": BOXES},
    ),
    "one point": (
        {"input_points": POINTS[:, :1, :1], "input_labels": LABELS[:, :1, :1]},
        {"point_coords": POINTS[:, :1, :1], "point_labels": LABELS[:, :1, :1]},
    ),
    "nothing": ({}, {}),  # one padding point per image, as both references do
}


def assert_matches(theirs, mine) -> None:
    assert mine.pred_masks.shape == theirs.pred_masks.shape
    assert mine.iou_scores.shape == theirs.iou_scores.shape
    assert mine.object_score_logits.shape == theirs.object_score_logits.shape
    assert (mine.pred_masks - theirs.pred_masks).abs().max() < ATOL
    assert (mine.iou_scores - theirs.iou_scores).abs().max() < ATOL
    assert (mine.object_score_logits - theirs.object_score_logits).abs().max() < ATOL


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_prompts_match_transformers(reference, ours, prompt, multimask) -> None:
    theirs_kw, ours_kw = PROMPTS[prompt]
    px = pixels()
    with torch.no_grad():
        theirs = reference(pixel_values=px, multimask_output=multimask, **theirs_kw)
        mine = ours(px, multimask_output=multimask, **ours_kw)
    assert mine.pred_masks.shape[2] == (3 if multimask else 1)
    assert theirs.pred_masks.abs().mean() > 1  # the weights are not degenerate
    assert_matches(theirs, mine)


def test_several_boxes_are_separate_prompts(reference, ours) -> None:
    """Five boxes on one image decode as five prompts, each as if alone."""
    boxes = torch.tensor([[[0.0, 0, 60, 60], [64, 64, 127, 127], [10, 70, 50, 120], [20, 20, 100, 40], [5, 5, 6, 6]]])
    px = pixels(1)
    with torch.no_grad():
        theirs = reference(pixel_values=px, input_boxes=boxes)
        embeddings = ours.encode_image(px)
        mine = ours.decode(embeddings, boxes=boxes)
        alone = ours.decode(embeddings, boxes=boxes[:, 3:4])
    assert mine.pred_masks.shape == (1, 5, 3, S // 4, S // 4)
    assert_matches(theirs, mine)
    assert torch.allclose(alone.pred_masks[0, 0], mine.pred_masks[0, 3], atol=ATOL)
    assert (mine.pred_masks[0, 0] - mine.pred_masks[0, 1]).abs().max() > 0.5  # the box matters, far beyond ATOL


def test_single_mask_without_the_stability_fallback(reference, ours) -> None:
    """dynamic_multimask_via_stability off: mask 0 itself; on (published): some prompts take another."""
    px, kw = pixels(), PROMPTS["both"]
    plain = Sam2(replace(ours.config, decoder=replace(ours.config.decoder, dynamic_multimask_via_stability=False)))
    plain.load_state_dict(ours.state_dict())
    reference.mask_decoder.dynamic_multimask_via_stability = False
    try:
        with torch.no_grad():
            theirs = reference(pixel_values=px, multimask_output=False, **kw[0])
            mine = plain.eval()(px, multimask_output=False, **kw[1])
            fallback = ours(px, multimask_output=False, **kw[1])
    finally:
        reference.mask_decoder.dynamic_multimask_via_stability = True
    assert_matches(theirs, mine)
    assert not torch.equal(mine.pred_masks, fallback.pred_masks)


def test_stability_fallback_keeps_a_stable_mask(ours) -> None:
    decoder = ours.sam_mask_decoder
    masks = torch.randn(2, 4, 8, 8)
    masks[0, 0] = 5.0  # all above +delta: stability 1
    iou = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.1, 0.2, 0.9, 0.3]])
    chosen, scores = decoder.select(masks, iou, multimask_output=False)
    assert torch.equal(chosen[0, 0], masks[0, 0]) and scores[0, 0] == 0.1
    assert torch.equal(chosen[1, 0], masks[1, 2]) and scores[1, 0] == 0.9  # unstable: the best-scored of 1..3


@pytest.mark.parametrize("side", [S // 4, S // 2], ids=["low-res", "resized"])
def test_mask_input_matches_transformers(reference, ours, side) -> None:
    """A mask prompt with points (one mask per image, shared by its prompts); another size is resized."""
    masks = torch.randn(2, 1, side, side, generator=torch.Generator().manual_seed(5)) * 4
    theirs_kw, ours_kw = PROMPTS["points"]
    px = pixels()
    with torch.no_grad():
        theirs = reference(pixel_values=px, input_masks=masks, **theirs_kw)
        mine = ours(px, mask_input=masks, **ours_kw)
        without = ours(px, **ours_kw)
    assert_matches(theirs, mine)
    assert (mine.pred_masks - without.pred_masks).abs().max() > 0.5  # the mask matters


def test_a_non_square_image_matches_transformers(reference, ours) -> None:
    """A 72 x 120 image resized (not padded) to the square input, normalised as SAM 2's transform does."""
    image = torch.rand(3, 72, 120, generator=torch.Generator().manual_seed(7))
    resized = F.interpolate(image[None], size=(S, S), mode="bilinear", align_corners=False)[0]
    px = ((resized - IMAGENET_MEAN) / IMAGENET_STD)[None]
    box = torch.tensor([[10.0, 20, 60, 50]]) * torch.tensor([S / 120, S / 72, S / 120, S / 72])  # image -> input pixels
    with torch.no_grad():
        theirs = reference(pixel_values=px, input_boxes=box[None])
        mine = ours(px, boxes=box[None])
    assert_matches(theirs, mine)


def test_image_embeddings_are_reused_for_several_prompts(reference, ours) -> None:
    px = pixels()
    with torch.no_grad():
        their_embeddings = reference.get_image_embeddings(px)
        embeddings = ours.encode_image(px)
        assert isinstance(embeddings, ImageEmbeddings)
        for prompt in ("box", "points", "both"):
            theirs_kw, ours_kw = PROMPTS[prompt]
            theirs = reference(image_embeddings=their_embeddings, **theirs_kw)
            assert_matches(theirs, ours.decode(embeddings, **ours_kw))
            assert torch.equal(ours.decode(embeddings, **ours_kw).pred_masks, ours(px, **ours_kw).pred_masks)
    assert (embeddings.image_embed - their_embeddings[-1]).abs().max() < ATOL
    for mine, theirs_map in zip(embeddings.high_res_feats, their_embeddings[:-1]):
        assert (mine - theirs_map).abs().max() < ATOL


def test_another_architecture_matches_transformers(tmp_path) -> None:
    """One two-way block, top-down features on three neck levels, another image size."""
    config = small_hf_config(image_size=64, num_hidden_layers=1)
    config.vision_config.fpn_top_down_levels = [1, 2, 3]
    reference = build_reference(config, seed=4)
    reference.save_pretrained(tmp_path)
    mine_model = load_sam2(tmp_path)
    assert mine_model.config.decoder.depth == 1 and mine_model.config.fpn_top_down_levels == (1, 2, 3)
    px = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    box, point, label = torch.tensor([[[5.0, 8, 40, 50]]]), torch.tensor([[[[30.0, 30]]]]), torch.tensor([[[1]]])
    with torch.no_grad():
        theirs = reference(pixel_values=px, input_boxes=box, input_points=point, input_labels=label)
        mine = mine_model(px, boxes=box, point_coords=point, point_labels=label)
    assert_matches(theirs, mine)


def test_the_original_layout_gives_the_same_outputs(ours, tmp_path, caplog) -> None:
    """Our tensors written under the original's names, with video-model tensors as the published .pt
    holds them: they are set aside (logged once), and the outputs are the Hugging Face layout's."""
    original = ours_to_original(ours.state_dict())
    original.update(
        {
            "memory_attention.layers.0.linear1.weight": torch.zeros(8, 4),
            "memory_encoder.out_proj.weight": torch.zeros(4, 8, 1, 1),
            "maskmem_tpos_enc": torch.zeros(7, 1, 1, 4),
            "no_obj_ptr": torch.zeros(1, 4),
            "obj_ptr_proj.layers.0.weight": torch.zeros(4, 4),
        }
    )
    file = tmp_path / "sam2.1_hiera_test.pt"
    torch.save({"model": original}, file)
    with caplog.at_level(logging.INFO, logger="gdino.checkpoint.sam2_loading"):
        from_original = load_sam2(file, config=ours.config)
    notes = [r.getMessage() for r in caplog.records if "video model" in r.getMessage()]
    assert len(notes) == 1 and "5 tensors" in notes[0] and "memory_attention 1" in notes[0]
    px, kw = pixels(), PROMPTS["both"][1]
    with torch.no_grad():
        a, b = ours(px, **kw), from_original(px, **kw)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)
    with pytest.raises(CheckpointError, match="none of the published sizes"):
        load_sam2(file)  # no config.json, and the small trunk is no published size


def test_hf_conversion_round_trips(reference) -> None:
    sd = reference.state_dict()
    converted = hf_to_ours(sd)
    assert converted.unknown == [] and converted.ignored == []
    back = ours_to_hf(converted.tensors)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_video_model_tensors_are_ignored_and_differing_position_copies_refused(reference) -> None:
    sd = dict(reference.state_dict())
    sd["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.zeros(2, 2)
    sd["no_object_pointer"] = torch.zeros(1, 2)
    converted = hf_to_ours(sd)
    assert sorted(converted.ignored) == ["memory_attention.layers.0.self_attn.q_proj.weight", "no_object_pointer"]
    sd["prompt_encoder.shared_embedding.positional_embedding"] = sd["shared_image_embedding.positional_embedding"] + 1
    assert any("one position matrix" in n for n in hf_to_ours(sd).unknown)


@pytest.mark.parametrize("size", ["tiny", "small", "base_plus", "large"])
def test_presets_are_the_published_sizes(size) -> None:
    """Each preset as the facebook/sam2.1-hiera-* config.json describes it, and its tensors exactly
    the ones transformers' Sam2Model (built on the meta device) holds."""
    published = {  # blocks, widths, heads, global blocks, background table, windows
        "tiny": ([1, 2, 7, 2], [96, 192, 384, 768], [1, 2, 4, 8], [5, 7, 9], [7, 7], [8, 4, 14, 7]),
        "small": ([1, 2, 11, 2], [96, 192, 384, 768], [1, 2, 4, 8], [7, 10, 13], [7, 7], [8, 4, 14, 7]),
        "base_plus": ([2, 3, 16, 3], [112, 224, 448, 896], [2, 4, 8, 16], [12, 16, 20], [14, 14], [8, 4, 14, 7]),
        "large": ([2, 6, 36, 4], [144, 288, 576, 1152], [2, 4, 8, 16], [23, 33, 43], [7, 7], [8, 4, 16, 8]),
    }[size]
    config = getattr(Sam2Config, size)()
    b = config.to_hf_dict()["vision_config"]["backbone_config"]
    keys = ("blocks_per_stage", "embed_dim_per_stage", "num_attention_heads_per_stage", "global_attention_blocks")
    keys += ("window_positional_embedding_background_size", "window_size_per_stage")
    assert tuple(b[k] for k in keys) == published
    hf_config = transformers.Sam2Config(**config.to_hf_dict())
    assert Sam2Config.from_hf_dict(hf_config.to_dict()) == config
    with torch.device("meta"):
        theirs, mine = transformers.Sam2Model(hf_config), Sam2(config)
    sd = theirs.state_dict()
    del sd["prompt_encoder.shared_embedding.positional_embedding"]  # meta tensors cannot be compared
    converted = hf_to_ours(sd)
    assert converted.unknown == []
    assert {k: v.shape for k, v in converted.tensors.items()} == {k: v.shape for k, v in mine.state_dict().items()}
    assert config_from_tensors(mine.state_dict()) == config


def test_the_default_transformers_config_is_tiny() -> None:
    assert Sam2Config.from_hf_dict(transformers.Sam2Config().to_dict()) == Sam2Config.tiny()
    video = transformers.Sam2VideoConfig().to_dict()  # the hub's files are Sam2VideoModel's
    assert Sam2Config.from_hf_dict(video) == Sam2Config.tiny()


def _set(path: str, value: object):
    """An edit of a config.json dict: ``path`` is dotted ("mask_decoder_config.num_hidden_layers")."""

    def edit(d: dict) -> None:
        *parents, key = path.split(".")
        for parent in parents:
            d = d[parent]
        d[key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set("model_type", "grounding-dino"), "model_type is 'grounding-dino'"),
        (_set("mask_decoder_config.num_hidden_layers", 3), "mask_decoder_config.num_hidden_layers = 3"),
        (_set("vision_config.backbone_channel_list", [768, 384, 192, 95]), "vision_config.backbone_channel_list"),
        (_set("vision_config.backbone_config.windw_size_per_stage", [8]), "backbone_config.windw_size_per_stage"),
        (_set("vision_config.backbone_config.hidden_act", "relu"), "backbone_config.hidden_act = 'relu'"),
        (_set("vision_config.backbone_config.blocks_per_stage", [1, 2, 7]), "blocks_per_stage has 3 stages"),
        (_set("prompt_encoder_config.patch_size", 8), "prompt_encoder_config.patch_size = 8"),
        (_set("mask_decoder_config.num_attention_heads", 0), "num_attention_heads must be a whole number >= 1"),
        (_set("num_maskmem", 7), "num_maskmem"),  # a video setting, in a Sam2Model (not Sam2VideoModel) config
    ],
)
def test_config_errors_name_the_key(edit, message) -> None:
    d = Sam2Config.tiny().to_hf_dict()
    edit(d)
    with pytest.raises(ValueError, match=re.escape(message)):
        Sam2Config.from_hf_dict(d)


def test_a_truncated_file_is_refused(hf_dir, tmp_path) -> None:
    data = (hf_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        load_sam2(tmp_path)
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1)}}, tmp_path / "x.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.pt"):
        load_sam2(tmp_path / "cut.pt")


def test_another_familys_file_is_refused(hf_dir, tmp_path) -> None:
    shapes = Path(__file__).parents[2] / "src" / "gdino" / "data" / "gdino-shapes"  # a Grounding DINO
    for path in (shapes, shapes / "model.safetensors"):
        with pytest.raises(CheckpointError, match="is not a SAM 2 checkpoint: its tensors"):
            load_sam2(path)
    from safetensors.torch import save_file

    sam = {
        "vision_encoder.layers.0.attn.qkv.weight": torch.zeros(6, 2),
        "mask_decoder.iou_token.weight": torch.zeros(1, 2),
    }
    save_file(sam, str(tmp_path / "sam_vit.safetensors"))  # SAM (v1) names: a ViT, not a Hiera
    with pytest.raises(CheckpointError, match="hold no Hiera trunk"):
        load_sam2(tmp_path / "sam_vit.safetensors")
    (tmp_path / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_bytes((shapes / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape("config.json: model_type is 'grounding-dino'")):
        load_sam2(tmp_path)


def test_missing_unknown_and_misshapen_tensors_are_named(hf_dir, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.conv_s0.bias"] = torch.zeros(3)
    sd["mask_decoder.extra_head.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=re.escape("fit no part of SAM 2: mask_decoder.extra_head.weight")):
        load_sam2(tmp_path)
    del sd["mask_decoder.extra_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as raised:
        load_sam2(tmp_path)
    assert "missing: sam_mask_decoder.iou_token.weight" in str(raised.value)
    assert "wrong shape: sam_mask_decoder.conv_s0.bias (3,) (the model's is (8,))" in str(raised.value)


def test_bad_prompt_shapes_are_refused(ours) -> None:
    embeddings = ours.encode_image(pixels(1))
    with pytest.raises(ValueError, match="point_coords and point_labels go together"):
        ours.decode(embeddings, point_coords=POINTS[:1])
    with pytest.raises(ValueError, match="one box per prompt"):
        ours.decode(embeddings, point_coords=POINTS[:1], point_labels=LABELS[:1], boxes=BOXES[:1, :1])
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 128, 128\)"):
        ours.encode_image(torch.zeros(1, 3, 96, 128))


@pytest.mark.slow  # the published hiera-tiny at 1024 x 1024: about 12 s on 2 cores (its trunk, twice)
def test_published_tiny_architecture_matches_transformers(tmp_path) -> None:
    reference = build_reference(transformers.Sam2Config(), seed=2)
    reference.save_pretrained(tmp_path)
    mine = load_sam2(tmp_path)
    assert mine.config == Sam2Config.tiny()
    px = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(9))
    boxes = torch.tensor([[[100.0, 200, 700, 900], [0, 0, 1023, 1023]]])
    points, labels = torch.tensor([[[[400.0, 500]], [[10, 1000]]]]), torch.tensor([[[1], [0]]])
    with torch.no_grad():
        their_embeddings = reference.get_image_embeddings(px)
        embeddings = mine.encode_image(px)
        for multimask in (True, False):
            theirs = reference(
                image_embeddings=their_embeddings,
                input_boxes=boxes,
                input_points=points,
                input_labels=labels,
                multimask_output=multimask,
            )
            ours_out = mine.decode(embeddings, points, labels, boxes, multimask_output=multimask)
            assert_matches(theirs, ours_out)
