"""gdino.models.sam (SAM, SAM-HQ) against transformers' SamModel / SamHQModel, and their checkpoints.

The reference models are transformers' own, built from small configs with seeded random weights
plus seeded noise (random init zeroes the relative positions, the position embedding and every
bias), saved with ``save_pretrained`` and loaded with ``gdino.checkpoint.sam_loading.load_sam``.
Both sides get the same ``pixel_values`` (random: the image processor is not under test) and
prompts. The published ViT-B architecture is checked too (slow).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from gdino.checkpoint.convert import ConversionError
from gdino.checkpoint.convert_sam import (
    config_from_tensors,
    hf_to_ours,
    original_to_ours,
    ours_to_hf,
    ours_to_original,
)
from gdino.checkpoint.sam_loading import load_sam
from gdino.models.sam.config import SamConfig
from gdino.models.sam.model import Sam
from gdino.utils.hub import CheckpointError

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).parents[2]
# Seeded noise on every parameter: a weight gets NOISE_GAIN / sqrt(its fan-in), so that the small and
# the published widths both keep mask logits in a realistic few-unit range; vectors (biases, norms)
# get NOISE_VECTOR.
NOISE_GAIN = 1.1
NOISE_VECTOR = 0.2
TOLERANCE = 1e-4
# An 8x8 grid with 3x3 windows: the windowed blocks pad to 9x9 (the padding path runs).
SMALL_VISION = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 8,
    "window_size": 3,
    "global_attn_indexes": [1],
    "num_pos_feats": 16,  # half the prompt encoder's width
    "output_channels": 32,
    "mlp_dim": 48,
}
SMALL_PROMPT = {"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 8}
# 8 decoder heads, the published number, which a file without config.json is built with.
SMALL_DECODER = {"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 8}
SMALL_DECODER["iou_head_hidden_dim"] = 32


def reference_config(hq: bool, small: bool = True) -> transformers.PretrainedConfig:
    """transformers' SamConfig (or SamHQConfig): the small test architecture, or the published ViT-B."""
    cls = transformers.SamHQConfig if hq else transformers.SamConfig
    if not small:
        return cls(mask_decoder_config={"vit_dim": 768}) if hq else cls()
    decoder = {**SMALL_DECODER, **({"vit_dim": 32} if hq else {})}
    return cls(vision_config=SMALL_VISION, prompt_encoder_config=SMALL_PROMPT, mask_decoder_config=decoder)


def build_reference(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """transformers' model, seeded, with seeded noise added to every parameter (in name order).

    The positional encoding's random matrix is drawn again at scale 1, as the original draws it:
    transformers' init scales it by hidden_size / 2, which makes every pixel's encoding noise.
    """
    torch.manual_seed(seed)
    cls = transformers.SamHQModel if config.model_type == "sam_hq" else transformers.SamModel
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            scale = NOISE_GAIN / math.sqrt(p[0].numel()) if p.ndim > 1 else NOISE_VECTOR  # p[0]: one output's inputs
            p.add_(torch.randn(p.shape, generator=g) * scale)
        pe = model.shared_image_embedding.positional_embedding
        pe.copy_(torch.randn(pe.shape, generator=g))
    return model


@pytest.fixture(autouse=True)
def _one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """The small models run on one thread: their matrices are tiny, and on a shared 2-core machine
    each multi-threaded op waits for the other core (about 10x slower). The published size keeps
    the session's threads."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Pair:
    hq: bool
    reference: torch.nn.Module
    ours: Sam
    directory: Path


@pytest.fixture(scope="module", params=[False, True], ids=["sam", "sam_hq"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    reference = build_reference(reference_config(request.param))
    directory = tmp_path_factory.mktemp("sam-hq" if request.param else "sam")
    reference.save_pretrained(directory)
    return Pair(request.param, reference, load_sam(directory), directory)


def inputs(seed: int = 2, images: int = 2) -> dict[str, torch.Tensor]:
    """Pixels and prompts for ``images`` images of the small architecture (64 px, 3 prompts each)."""
    g = torch.Generator().manual_seed(seed)
    corners = (torch.rand(images, 3, 2, 2, generator=g) * 64).sort(dim=2).values  # (B, P, 2, xy) x0 <= x1
    return {
        "pixel_values": torch.randn(images, 3, 64, 64, generator=g),
        "points": torch.rand(images, 3, 2, 2, generator=g) * 64,
        "labels": torch.tensor([[1, 0], [1, 1], [0, 1]]).expand(images, 3, 2),
        "boxes": corners.transpose(2, 3).reshape(images, 3, 4),  # x0 y0 x1 y1
        "masks": torch.randn(images, 1, 32, 32, generator=g),
    }


PROMPTS = {
    "box": lambda x: {"input_boxes": x["boxes"][:, :1]},
    "boxes": lambda x: {"input_boxes": x["boxes"]},
    "points": lambda x: {"input_points": x["points"], "input_labels": x["labels"]},
    "points_and_boxes": lambda x: {"input_points": x["points"], "input_labels": x["labels"], "input_boxes": x["boxes"]},
    # every label: foreground, background, "not a point" (-1) and transformers' padding (-10)
    "point_labels": lambda x: {
        "input_points": x["points"],
        "input_labels": torch.tensor([[1, -10], [0, -1], [-1, 1]])[None].expand(x["points"].shape[0], 3, 2),
    },
    "box_and_mask": lambda x: {"input_boxes": x["boxes"], "input_masks": x["masks"]},
    "no_prompt": lambda x: {},
}


def assert_close(ours: object, reference: object, what: str = "") -> tuple[float, float]:
    """pred_masks and iou_scores within TOLERANCE, same shapes; returns the max differences."""
    a_masks, a_iou = ours.pred_masks, ours.iou_scores  # type: ignore[attr-defined]
    b_masks, b_iou = reference.pred_masks, reference.iou_scores  # type: ignore[attr-defined]
    assert a_masks.shape == b_masks.shape and a_iou.shape == b_iou.shape, what
    masks, iou = float((a_masks - b_masks).abs().max()), float((a_iou - b_iou).abs().max())
    assert masks <= TOLERANCE and iou <= TOLERANCE, (what, masks, iou)
    return masks, iou


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_outputs_match_transformers(pair: Pair, prompt: str, multimask: bool) -> None:
    x = inputs()
    kwargs = {"pixel_values": x["pixel_values"], "multimask_output": multimask, **PROMPTS[prompt](x)}
    with torch.no_grad():
        ours, reference = pair.ours(**kwargs), pair.reference(**kwargs)
    assert_close(ours, reference, prompt)
    masks = ours.pred_masks
    assert masks.shape[2] == (3 if multimask else 1) and masks.shape[-2:] == (32, 32)
    assert masks.std() > 0.05  # not degenerate
    assert not torch.allclose(masks[0], masks[1], atol=1e-3)  # the two images differ


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
def test_hq_token_only_matches_transformers(pair: Pair, multimask: bool) -> None:
    if not pair.hq:
        pytest.skip("SAM-HQ only")
    x = inputs(seed=3)
    kwargs = {"pixel_values": x["pixel_values"], "multimask_output": multimask, "hq_token_only": True}
    kwargs |= PROMPTS["points_and_boxes"](x)
    with torch.no_grad():
        ours, reference = pair.ours(**kwargs), pair.reference(**kwargs)
    assert_close(ours, reference)
    assert ours.pred_masks.shape[2] == 1


def test_prompts_change_the_masks(pair: Pair) -> None:
    """Each of several boxes on one image gets its own masks, and the same box alone the same ones."""
    x = inputs(images=1)
    with torch.no_grad():
        several = pair.ours(pixel_values=x["pixel_values"], input_boxes=x["boxes"])
        second = pair.ours(pixel_values=x["pixel_values"], input_boxes=x["boxes"][:, 1:2])
    assert several.pred_masks.shape == (1, 3, 3, 32, 32)
    assert not torch.allclose(several.pred_masks[0, 0], several.pred_masks[0, 1], atol=1e-3)
    torch.testing.assert_close(several.pred_masks[:, 1:2], second.pred_masks, atol=1e-5, rtol=0)


def test_image_embeddings_reused_for_several_prompts(pair: Pair) -> None:
    x = inputs(seed=4)
    with torch.no_grad():
        image = pair.ours.get_image_embeddings(x["pixel_values"])
        hf_image = pair.reference.get_image_embeddings(x["pixel_values"])
        hf_kwargs = {"image_embeddings": hf_image[0], "intermediate_embeddings": hf_image[1]} if pair.hq else {}
        hf_kwargs = hf_kwargs or {"image_embeddings": hf_image}
        for prompt in ("box", "points", "points_and_boxes"):
            kwargs = PROMPTS[prompt](x)
            reused = pair.ours(
                image_embeddings=image.image_embeddings, intermediate_embeddings=image.intermediate_embeddings, **kwargs
            )
            direct = pair.ours(pixel_values=x["pixel_values"], **kwargs)
            assert torch.equal(reused.pred_masks, direct.pred_masks) and torch.equal(
                reused.iou_scores, direct.iou_scores
            )
            assert_close(reused, pair.reference(**hf_kwargs, **kwargs), prompt)
    assert (image.intermediate_embeddings is not None) == pair.hq


def test_original_layout_gives_the_same_outputs(pair: Pair, tmp_path: Path) -> None:
    """Our state dict written in the original layout (a plain .pth, no config.json) loads into the
    same architecture (read from the tensors) and, computing as transformers does, the same outputs."""
    file = tmp_path / ("sam_hq_vit_test.pth" if pair.hq else "sam_vit_test.pth")
    torch.save(ours_to_original(pair.ours.state_dict()), file)
    from_original = load_sam(file, reference="transformers")
    assert from_original.config == pair.ours.config
    x = inputs(seed=5)
    kwargs = {"pixel_values": x["pixel_values"], **PROMPTS["points_and_boxes"](x)}
    with torch.no_grad():
        a, b = from_original(**kwargs), pair.ours(**kwargs)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.iou_scores, b.iou_scores)


def test_original_layout_computes_as_the_original(pair: Pair, tmp_path: Path) -> None:
    """An original file follows the original code by default (config.REFERENCES): two-way norms at
    eps 1e-5; SAM-HQ keeps the best multi-mask output and upscales the two-way transformer's output."""
    file = tmp_path / "sam.pth"
    torch.save(ours_to_original(pair.ours.state_dict()), file)
    original = load_sam(file)
    assert original.config == pair.ours.config.with_reference("original")
    assert (original.config.decoder_norm_eps, pair.ours.config.decoder_norm_eps) == (1e-5, 1e-6)
    x = inputs(seed=6)
    kwargs = {"pixel_values": x["pixel_values"], **PROMPTS["boxes"](x)}
    with torch.no_grad():
        a, b = original(**kwargs), pair.ours(**kwargs)
    if pair.hq:  # one mask; its score is transformers' best (sorted first), up to the norms' eps
        assert a.pred_masks.shape[2] == a.iou_scores.shape[2] == 1
        torch.testing.assert_close(a.iou_scores[..., 0], b.iou_scores[..., 0], atol=1e-3, rtol=0)
    else:  # the same masks up to the norms' eps
        torch.testing.assert_close(a.pred_masks, b.pred_masks, atol=1e-3, rtol=0)
        assert not torch.equal(a.pred_masks, b.pred_masks)


# ---------------------------------------------------------------------------------------------
# configuration


def _vision(**kw: object) -> dict[str, object]:
    return {"vision_config": {**SMALL_VISION, **kw}, "prompt_encoder_config": SMALL_PROMPT}


# The published sizes as transformers' conversion script builds them (ViT-B is SamVisionConfig()).
PUBLISHED_VISION: dict[str, dict[str, object]] = {
    "vit_b": {},
    "vit_l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
    "vit_h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16},
}
PUBLISHED_VISION["vit_l"]["global_attn_indexes"] = [5, 11, 17, 23]
PUBLISHED_VISION["vit_h"]["global_attn_indexes"] = [7, 15, 23, 31]


@pytest.mark.parametrize("name", sorted(PUBLISHED_VISION))
@pytest.mark.parametrize("hq", [False, True], ids=["sam", "sam_hq"])
def test_presets_are_the_published_configs(name: str, hq: bool) -> None:
    vision = PUBLISHED_VISION[name]
    cls = transformers.SamHQConfig if hq else transformers.SamConfig
    decoder = {"vit_dim": vision.get("hidden_size", 768)} if hq else {}
    reference = cls(vision_config=vision, mask_decoder_config=decoder)
    preset = getattr(SamConfig, name)(hq=hq)
    assert SamConfig.from_hf_dict(reference.to_dict()) == preset
    written = {k: v for k, v in preset.to_hf_dict().items() if k not in ("model_type", "architectures")}
    assert SamConfig.from_hf_dict(cls(**written).to_dict()) == preset  # to_hf_dict is the inverse


def test_preset_parameter_counts() -> None:
    """ViT-B, -L, -H: 93.7M, 312.3M, 641.1M tensors, as published (SAM-HQ adds 1.3M to 1.6M)."""
    counts = {}
    for name in ("vit_b", "vit_l", "vit_h"):
        for hq in (False, True):
            with torch.device("meta"):
                model = Sam(getattr(SamConfig, name)(hq=hq))
            counts[name, hq] = sum(t.numel() for t in model.state_dict().values())
    assert counts["vit_b", False] == 93_735_728  # transformers' SamModel(SamConfig()), the PE counted once
    assert [round(counts[n, False] / 1e6, 1) for n in ("vit_b", "vit_l", "vit_h")] == [93.7, 312.3, 641.1]
    assert [round((counts[n, True] - counts[n, False]) / 1e6, 1) for n in ("vit_b", "vit_l", "vit_h")] == [
        1.1,
        1.3,
        1.6,
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "sam2"}, "model_type is 'sam2'"),
        (
            {"vision_config": {**SMALL_VISION, "hidden_size": "wide"}},
            "vision_config.hidden_size must be a whole number",
        ),
        ({"vision_config": {**SMALL_VISION, "num_pos_feats": 8}}, "2 * vision_config.num_pos_feats = 16"),
        ({"vision_config": {**SMALL_VISION, "global_attn_indexes": [3]}}, "vision_config.global_attn_indexes [3]"),
        ({"vision_config": {**SMALL_VISION, "hidden_act": "relu"}}, "vision_config.hidden_act='relu'"),
        ({"vision_config": {**SMALL_VISION, "num_attention_heads": 5}}, "vision_config.num_attention_heads = 5"),
        ({"prompt_encoder_config": {**SMALL_PROMPT, "image_size": 128}}, "prompt_encoder_config.image_size = 128"),
        ({"mask_decoder_config": {**SMALL_DECODER, "num_attention_heads": 3}}, "num_attention_heads = 3"),
        ({"mask_decoder_config": {**SMALL_DECODER, "iou_head_depth": 1}}, "mask_decoder_config.iou_head_depth"),
        ({"mask_decoder_config": "small"}, "mask_decoder_config must be an object"),
        ({"model_type": "sam_hq", "mask_decoder_config": {**SMALL_DECODER, "vit_dim": 64}}, "vit_dim = 64"),
    ],
)
def test_bad_config_names_the_key(change: dict[str, object], message: str) -> None:
    d = {"model_type": "sam", **_vision(), "mask_decoder_config": SMALL_DECODER, **change}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
        SamConfig.from_hf_dict(d)


def test_reference_is_checked() -> None:
    with pytest.raises(ValueError, match="reference must be one of"):
        SamConfig().with_reference("mine")
    with pytest.raises(ValueError, match="hq_multimask"):
        Sam(replace(SamConfig.vit_b(hq=True), hq_multimask="all"))


# ---------------------------------------------------------------------------------------------
# key conversion and loading


def test_conversion_round_trips(pair: Pair) -> None:
    saved = pair.reference.state_dict()
    saved.pop("prompt_encoder.shared_embedding.positional_embedding")  # tied: save_pretrained writes one
    ours, unknown = hf_to_ours(saved)
    assert unknown == []
    assert set(ours) == set(pair.ours.state_dict())
    back = ours_to_hf(ours)
    assert set(back) == set(saved) and all(torch.equal(back[k], saved[k]) for k in saved)
    assert config_from_tensors(ours) == pair.ours.config.with_reference("original")


def test_both_copies_of_the_positional_encoding(pair: Pair) -> None:
    """Older files store the tied matrix twice; equal copies load, differing ones are refused."""
    saved = dict(pair.reference.state_dict())
    pe = saved["shared_image_embedding.positional_embedding"]
    assert torch.equal(saved["prompt_encoder.shared_embedding.positional_embedding"], pe)
    ours, unknown = hf_to_ours(saved)
    assert unknown == [] and torch.equal(ours["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"], pe)
    saved["prompt_encoder.shared_embedding.positional_embedding"] = pe + 1
    with pytest.raises(ConversionError, match="must hold the same values"):
        hf_to_ours(saved)


def test_unknown_names_are_returned() -> None:
    t = torch.zeros(1)
    assert hf_to_ours({"vision_encoder.extra.weight": t, "vision_encoder.pos_embed": t})[1] == [
        "vision_encoder.extra.weight"
    ]
    ours, unknown = original_to_ours({"pixel_mean": t, "module.image_encoder.pos_embed": t, "optimizer.state": t})
    assert list(ours) == ["image_encoder.pos_embed"] and unknown == ["optimizer.state"]


def _write_original(pair: Pair, directory: Path, drop: str | None = None, extra: str | None = None) -> Path:
    sd = ours_to_original(pair.ours.state_dict())
    if drop:
        sd.pop(drop)
    if extra:
        sd[extra] = torch.zeros(3)
    file = directory / "sam.pth"
    torch.save(sd, file)
    return file


def test_load_refuses_a_truncated_file(pair: Pair, tmp_path: Path) -> None:
    data = (pair.directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_sam(tmp_path)


def test_load_names_missing_and_unexpected_tensors(pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing 1: image_encoder\.blocks\.1\.attn\.rel_pos_h"):
        load_sam(_write_original(pair, tmp_path, drop="image_encoder.blocks.1.attn.rel_pos_h"), config=pair.ours.config)
    with pytest.raises(CheckpointError, match=r"unexpected 1: mask_decoder\.extra"):
        load_sam(_write_original(pair, tmp_path, extra="mask_decoder.extra"), config=pair.ours.config)
    with pytest.raises(CheckpointError, match=r"fit no part of SAM: optimizer"):
        load_sam(_write_original(pair, tmp_path, extra="optimizer"))


def test_load_names_wrong_shapes(pair: Pair, tmp_path: Path) -> None:
    wider = replace(pair.ours.config, decoder_mlp_dim=128)
    with pytest.raises(CheckpointError, match=r"wrong shape \d+: mask_decoder\.transformer\.layers\.0\.mlp\.lin1"):
        load_sam(pair.directory, config=wider)


def test_load_refuses_another_config(pair: Pair, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((pair.directory / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text('{"model_type": "sam2"}')
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'sam2'"):
        load_sam(tmp_path)


def test_load_refuses_a_grounding_dino_checkpoint() -> None:
    shapes = ROOT / "src" / "gdino" / "data" / "gdino-shapes"
    with pytest.raises(CheckpointError, match="is a Grounding DINO checkpoint"):
        load_sam(shapes)


def test_load_refuses_a_sam2_checkpoint(tmp_path: Path) -> None:
    """SAM 2.1's files hold a "model" dict under its own names (image_encoder.trunk, sam_mask_decoder)."""
    t = torch.zeros(2)
    names = ["image_encoder.trunk.patch_embed.proj.weight", "image_encoder.neck.convs.0.conv.weight"]
    names += ["sam_mask_decoder.iou_token.weight", "memory_attention.layers.0.norm1.weight"]
    torch.save({"model": dict.fromkeys(names, t)}, tmp_path / "sam2.1_hiera_tiny.pt")
    with pytest.raises(CheckpointError, match=r"is a SAM 2 checkpoint \(4 tensors"):
        load_sam(tmp_path / "sam2.1_hiera_tiny.pt")


def test_load_refuses_what_is_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_sam(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="not exactly one original checkpoint"):
        load_sam(tmp_path)
    torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="holds no SAM image encoder"):
        load_sam(tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------------
# the published architecture


@pytest.mark.slow  # ViT-B at 1024 x 1024: about 2 minutes on 2 cores (init, save, two image encoders)
@pytest.mark.parametrize("hq", [False, True], ids=["sam", "sam_hq"])
def test_published_vit_b_matches_transformers(hq: bool, tmp_path: Path) -> None:
    reference = build_reference(reference_config(hq, small=False))
    reference.save_pretrained(tmp_path)
    ours = load_sam(tmp_path)
    assert ours.config == SamConfig.vit_b(hq=hq).with_reference("transformers")
    g = torch.Generator().manual_seed(7)
    pixel_values = torch.randn(1, 3, 1024, 1024, generator=g)
    corners = (torch.rand(1, 2, 2, 2, generator=g) * 1024).sort(dim=2).values
    prompts = {
        "boxes": {"input_boxes": corners.transpose(2, 3).reshape(1, 2, 4)},
        "points": {
            "input_points": torch.rand(1, 2, 3, 2, generator=g) * 1024,
            "input_labels": torch.tensor([[[1, 0, 1]] * 2]),
        },
    }
    with torch.no_grad():
        image = ours.get_image_embeddings(pixel_values)
        hf_image = reference.get_image_embeddings(pixel_values)
        embeddings = hf_image[0] if hq else hf_image
        torch.testing.assert_close(image.image_embeddings, embeddings, atol=TOLERANCE, rtol=0)
        hf_kwargs = {"image_embeddings": embeddings} | ({"intermediate_embeddings": hf_image[1]} if hq else {})
        for name, prompt in prompts.items():
            for multimask in (True, False):
                a = ours(
                    image_embeddings=image.image_embeddings,
                    intermediate_embeddings=image.intermediate_embeddings,
                    multimask_output=multimask,
                    **prompt,
                )
                masks, iou = assert_close(a, reference(**hf_kwargs, multimask_output=multimask, **prompt), name)
                print(f"vit_b {'sam_hq' if hq else 'sam'} {name} multimask={multimask}: {masks:.1e} {iou:.1e}")
                assert a.pred_masks.std() > 0.1  # not degenerate
