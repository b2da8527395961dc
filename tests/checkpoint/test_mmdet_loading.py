"""An mmdetection ``.pth`` (MM-Grounding-DINO, LLMDet as OpenMMLab publishes them) loads through
``from_pretrained`` like any checkpoint: the architecture from its tensors, its names through
``gdino.checkpoint.convert_mmdet``, and the same detections as the Hugging Face layout."""

from __future__ import annotations

import numpy as np
import torch

from gdino import GroundingDinoForObjectDetection
from gdino.checkpoint.convert_mmdet import ours_to_mmdet
from reference import as_mm_config, build_reference, save_reference, small_reference_config


def _published_heads():
    """A small MM config with the head counts every published model has (8 transformer heads,
    BERT's 64 channels a head), which an mmdetection file's shapes cannot show."""
    config = small_reference_config(encoder_attention_heads=8, decoder_attention_heads=8)
    config.text_config.num_attention_heads = 1
    return as_mm_config(config, share=False)


def test_an_mmdet_file_loads_as_its_hugging_face_layout(tmp_path, data_dir) -> None:
    reference = build_reference(_published_heads(), seed=12)
    hf = GroundingDinoForObjectDetection.from_pretrained(save_reference(reference, tmp_path / "hf"))
    path = tmp_path / "grounding_dino_swin-t_pretrain.pth"
    state = ours_to_mmdet(hf.state_dict(), hf.config.decoder_layers)
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state}, path)
    mm = GroundingDinoForObjectDetection.from_pretrained(path, box_refinement="transformers")
    assert (mm.config.model_type, mm.config.share_box_heads, mm.config.share_class_heads) == (
        "mm-grounding-dino",
        False,
        False,
    )
    ours = hf.state_dict()
    for name, tensor in mm.state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    mm.processor = hf.processor  # an mmdetection file has no processor files: the same settings
    for prompt in ("a cat. a remote control.", ["cat", "sofa"]):
        a = hf.detect(data_dir / "chelsea.png", prompt, box_threshold=0.0)
        b = mm.detect(data_dir / "chelsea.png", prompt, box_threshold=0.0)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.labels == b.labels
