"""An original ``.pth`` carries no config.json: its architecture is read from its tensors
(``gdino.checkpoint.architecture``), so grounding-dino-base's ``groundingdino_swinb_cogcoor.pth``
loads as such, and files of other families are refused with what they hold."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gdino import CheckpointError, GroundingDinoConfig, GroundingDinoForObjectDetection
from gdino.checkpoint.architecture import original_config
from gdino.checkpoint.convert import ours_to_original
from reference import DATA, build_reference, save_reference, small_reference_config

# grounding-dino-base's Swin-B: window 12 (pretrained at 384), embed 128, depths 2-2-18-2
SWIN_B = {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12, "image_size": 384}


def _published_tiny() -> dict[str, torch.Tensor]:
    """groundingdino_swint_ogc.pth's names and shapes (the shared key list), as empty tensors."""
    rows = [line.split("\t") for line in (DATA / "groundingdino_swint_ogc.keys.tsv").read_text().splitlines()]
    shapes = {name: tuple(int(x) for x in shape.strip("()").split(",") if x.strip()) for name, shape, _ in rows}
    return {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}


def _same_architecture(a: GroundingDinoConfig, b: GroundingDinoConfig) -> None:
    keep = ("box_logit_eps", "box_logit_original")  # chosen by the layout, not the architecture
    assert dataclasses.replace(a, **{k: getattr(b, k) for k in keep}) == b


def test_the_published_tiny_file_reads_as_tiny() -> None:
    _same_architecture(original_config(_published_tiny()), GroundingDinoConfig.tiny())


def test_a_swin_b_file_alone_loads_as_the_hugging_face_layout(tmp_path, data_dir) -> None:
    """The small model with grounding-dino-base's window 12, written in the original layout with no
    config.json beside it: the same architecture and, with the same box refinement, the same outputs."""
    # the published head counts, which shapes cannot show: 8 attention heads, 64 channels a BERT head
    config = small_reference_config(
        backbone={"window_size": 12, "image_size": 384}, encoder_attention_heads=8, decoder_attention_heads=8
    )
    config.text_config.num_attention_heads = 1
    reference = build_reference(config, seed=7)
    hf_dir = save_reference(reference, tmp_path / "hf")
    hf = GroundingDinoForObjectDetection.from_pretrained(hf_dir)
    pth = tmp_path / "alone" / "groundingdino_swinb_cogcoor.pth"
    pth.parent.mkdir()
    torch.save({"model": ours_to_original(hf.state_dict(), hf.config.decoder_layers)}, pth)
    original = GroundingDinoForObjectDetection.from_pretrained(pth, box_refinement="transformers")
    assert original.config.swin.window_size == 12
    _same_architecture(original.config, hf.config)
    original.processor = hf.processor  # the .pth has no processor files: the same 800-pixel settings
    for prompt in ("a cat. a remote control.", ["cat", "sofa"]):
        a = hf.detect(data_dir / "chelsea.png", prompt, box_threshold=0.0)
        b = original.detect(data_dir / "chelsea.png", prompt, box_threshold=0.0)
        torch.testing.assert_close(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes), rtol=0, atol=1e-3)
        assert a.labels == b.labels


@pytest.mark.parametrize(
    ("tensors", "needle"),
    [
        ({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "mask_decoder.iou_token.weight": torch.zeros(1)},
         "Segment Anything"),
        ({"backbone.0.body.conv1.weight": torch.zeros(1), "transformer.level_embed": torch.zeros(1)},
         "ResNet backbone"),
        ({"something.else": torch.zeros(1)}, "something."),
    ],
)  # fmt: skip
def test_another_family_is_named(tmp_path, tensors, needle) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": tensors}, path)
    with pytest.raises(CheckpointError, match=needle) as caught:
        GroundingDinoForObjectDetection.from_pretrained(path)
    assert "not a Grounding DINO checkpoint" in str(caught.value) and "MM-Grounding-DINO" in str(caught.value)


@pytest.mark.slow  # the published Swin-B size, built twice
def test_grounding_dino_base_loads_alike_from_both_layouts(tmp_path, data_dir) -> None:
    """Swin-B at its published size: the Hugging Face layout (config.json) and the original .pth
    (architecture from the tensors) give one model with the same outputs."""
    from transformers import GroundingDinoConfig as HFConfig
    from transformers import SwinConfig

    config = HFConfig(backbone_config=SwinConfig(**SWIN_B, out_features=["stage2", "stage3", "stage4"]))
    reference = build_reference(config, seed=8)
    hf = GroundingDinoForObjectDetection.from_pretrained(save_reference(reference, tmp_path / "hf"))
    del reference
    pth = tmp_path / "groundingdino_swinb_cogcoor.pth"
    torch.save({"model": ours_to_original(hf.state_dict(), hf.config.decoder_layers)}, pth)
    original = GroundingDinoForObjectDetection.from_pretrained(pth, box_refinement="transformers")
    _same_architecture(original.config, hf.config)
    assert original.config.swin == hf.config.swin and hf.config.swin.depths == (2, 2, 18, 2)
    original.processor = hf.processor
    a = hf.detect(data_dir / "chelsea.png", "a cat. a remote control.", box_threshold=0.0)
    b = original.detect(data_dir / "chelsea.png", "a cat. a remote control.", box_threshold=0.0)
    torch.testing.assert_close(torch.from_numpy(a.scores), torch.from_numpy(b.scores), rtol=0, atol=1e-4)
