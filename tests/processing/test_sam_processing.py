"""``SamProcessor`` and ``Sam2Processor`` against transformers' processors.

transformers' SAM processor runs on its PIL image processor (``SamImageProcessorPil``), so SAM's
pixels, sizes, prompts and ``post_process_masks`` are compared with it directly. SAM 2.1's image
processor needs torchvision (not installed), so its prompts are compared with transformers'
``Sam2Processor`` (given ``original_sizes``), and its pixels and mask post-processing with the
documented arithmetic computed here (resize to the square, rescale, normalise; one bilinear resize).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gdino.processing.sam2_processor import Sam2Processor
from gdino.processing.sam_processor import SamProcessor

transformers = pytest.importorskip("transformers")
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def theirs_sam():
    return transformers.SamProcessor(SamImageProcessorPil())


IMAGES = [picture(500, 300), picture(240, 410, seed=1)]  # landscape and portrait
BOXES = [
    [[10, 20, 100, 200], [0, 0, 499, 299], [250.5, 100, 400, 280]],
    [[5, 5, 200, 400], [30, 60, 90, 120], [1, 2, 3, 4]],
]
POINTS = [[[[50, 60]], [[70, 80]], [[400, 250]]], [[[10, 300]], [[200, 50]], [[100, 100]]]]
LABELS = [[[1], [0], [1]], [[1], [1], [0]]]


def test_sam_matches_transformers(theirs_sam) -> None:
    ours = SamProcessor()(images=IMAGES, input_boxes=BOXES, input_points=POINTS, input_labels=LABELS)
    theirs = theirs_sam(images=IMAGES, input_boxes=BOXES, input_points=POINTS, input_labels=LABELS, return_tensors="pt")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=key)
    assert ours["reshaped_input_sizes"].tolist() == [[614, 1024], [1024, 599]]


def test_sam_single_image_prompts_match_transformers(theirs_sam) -> None:
    image = IMAGES[1]
    for kwargs in (
        {"input_points": [[[[100, 200], [50, 60]]]], "input_labels": [[[1, 0]]]},
        {"input_boxes": [[[20, 30, 200, 300]]]},
    ):
        ours = SamProcessor()(images=image, **kwargs)
        theirs = theirs_sam(images=image, return_tensors="pt", **kwargs)
        for key in kwargs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-9, rtol=0, msg=key)


def test_sam_post_process_masks_matches_transformers(theirs_sam) -> None:
    inputs = SamProcessor()(images=IMAGES)
    logits = torch.randn(2, 3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    args = (inputs["original_sizes"], inputs["reshaped_input_sizes"])
    ours = SamProcessor().post_process_masks(logits, *args)
    theirs = theirs_sam.post_process_masks(logits.clone(), *args)
    for a, b, (h, w) in zip(ours, theirs, [(300, 500), (410, 240)]):
        assert a.shape == b.shape == (3, 3, h, w) and a.dtype == torch.bool
        assert torch.equal(a, b)
    raw = SamProcessor().post_process_masks(logits, *args, binarize=False)
    raw_theirs = theirs_sam.post_process_masks(logits.clone(), *args, binarize=False)
    torch.testing.assert_close(raw[0], raw_theirs[0])
    above = SamProcessor().post_process_masks(logits, *args, mask_threshold=0.5)
    assert torch.equal(above[1], theirs_sam.post_process_masks(logits.clone(), *args, mask_threshold=0.5)[1])


def test_sam2_prompts_match_transformers() -> None:
    theirs = transformers.Sam2Processor(SamImageProcessorPil(), target_size=1024)
    sizes = [[300, 500], [410, 240]]
    ragged = [[[[50, 60], [10, 20]], [[70, 80]]], [[[10, 300]], [[200, 50], [1, 1]]]]  # padded with -10
    labels = [[[1, 0], [1]], [[1], [0, 1]]]
    boxes = [[[10, 20, 100, 200], [0, 0, 499, 299]], [[5, 5, 200, 400], [30, 60, 90, 120]]]
    ours = Sam2Processor()(original_sizes=sizes, input_points=ragged, input_labels=labels, input_boxes=boxes)
    ref = theirs(original_sizes=sizes, input_points=ragged, input_labels=labels, input_boxes=boxes, return_tensors="pt")
    for key in ("input_points", "input_labels", "input_boxes", "original_sizes"):
        assert ours[key].dtype == ref[key].dtype, key
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=0, msg=key)
    assert ours["input_points"][0, 1, 1].tolist() == [-10, -10] and ours["input_labels"][0, 1, 1] == -10


def sam2_pixels_by_hand(image: Image.Image, side: int = 1024) -> np.ndarray:
    """transformers' Sam2ImageProcessor, as documented: resize to side x side (bilinear), x / 255, normalise."""
    resized = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR)).astype(np.float64) / 255
    return ((resized.astype(np.float32) - MEAN) / STD).transpose(2, 0, 1)


def test_sam2_pixels_follow_the_arithmetic() -> None:
    inputs = Sam2Processor()(images=IMAGES, input_boxes=[[[10, 20, 100, 200]], [[5, 5, 200, 400]]])
    assert inputs["pixel_values"].shape == (2, 3, 1024, 1024) and set(inputs) == {
        "pixel_values",
        "original_sizes",
        "input_boxes",
    }
    for i, image in enumerate(IMAGES):
        np.testing.assert_allclose(inputs["pixel_values"][i].numpy(), sam2_pixels_by_hand(image), atol=1e-6)
    assert inputs["original_sizes"].tolist() == [[300, 500], [410, 240]]
    torch.testing.assert_close(
        inputs["input_boxes"][0, 0], torch.tensor([10 * 1024 / 500, 20 * 1024 / 300, 204.8, 200 * 1024 / 300])
    )


def test_sam2_resize_is_within_a_grey_level_of_torchvisions() -> None:
    """torchvision's antialiased bilinear resize (what transformers' SAM 2.1 processor uses), in float."""
    image = IMAGES[0]
    ours = np.asarray(image.resize((1024, 1024), Image.Resampling.BILINEAR)).astype(np.int16)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    theirs = F.interpolate(tensor, (1024, 1024), mode="bilinear", align_corners=False, antialias=True)
    theirs = theirs.round().clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(ours - theirs).max() <= 1


def test_sam2_post_process_masks_is_one_bilinear_resize() -> None:
    logits = torch.randn(2, 2, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[300, 500], [410, 240]])
    masks = Sam2Processor().post_process_masks(logits, sizes)
    raw = Sam2Processor().post_process_masks(logits, sizes, binarize=False)
    for i, (h, w) in enumerate(sizes.tolist()):
        expected = F.interpolate(logits[i], (h, w), mode="bilinear", align_corners=False)
        torch.testing.assert_close(raw[i], expected)
        assert torch.equal(masks[i], expected > 0) and masks[i].any() and not masks[i].all()


def test_from_pretrained_reads_the_preprocessor_config(tmp_path) -> None:
    config = {
        "image_processor_type": "Sam2ImageProcessorFast",
        "size": {"height": 512, "width": 512},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    processor = Sam2Processor.from_pretrained(tmp_path)
    assert processor.settings.size == 512 and processor.settings.image_mean == (0.5, 0.5, 0.5)
    pixels = processor(images=IMAGES[0])["pixel_values"]
    resized = np.asarray(IMAGES[0].resize((512, 512), Image.Resampling.BILINEAR)).astype(np.float64) / 255
    np.testing.assert_allclose(
        pixels[0].numpy(), ((resized.astype(np.float32) - 0.5) / 0.25).transpose(2, 0, 1), atol=1e-6
    )
    sam = tmp_path / "sam"
    sam.mkdir()
    (sam / "preprocessor_config.json").write_text(
        json.dumps({"size": {"longest_edge": 256}, "pad_size": {"height": 256, "width": 256}})
    )
    inputs = SamProcessor.from_pretrained(sam)(images=IMAGES[0])
    assert inputs["pixel_values"].shape == (1, 3, 256, 256) and inputs["reshaped_input_sizes"].tolist() == [[154, 256]]
    (sam / "preprocessor_config.json").write_text(json.dumps({"size": {"longest_edge": 256}, "do_pad": False}))
    with pytest.raises(ValueError, match="must be padded"):
        SamProcessor.from_pretrained(sam)


def test_bad_prompts_are_refused() -> None:
    processor = Sam2Processor()
    with pytest.raises(ValueError, match=r"input_boxes must be a nested list of 3 levels \(\[image\]\[box\]"):
        processor(images=IMAGES[0], input_boxes=[[10, 20, 30, 40]])
    with pytest.raises(ValueError, match="different lengths"):
        processor(images=IMAGES, input_boxes=[[[0, 0, 5, 5]], [[0, 0, 5, 5], [1, 1, 4, 4]]])
    with pytest.raises(ValueError, match="input_points must end in 2 numbers"):
        processor(images=IMAGES[0], input_points=[[[[1, 2, 3]]]])
    with pytest.raises(ValueError, match="must have the same images, objects and points"):
        processor(images=IMAGES[0], input_points=[[[[1, 2]]]], input_labels=[[[1, 1]]])
    with pytest.raises(ValueError, match="give images, or original_sizes"):
        processor(input_boxes=[[[0, 0, 5, 5]]])
