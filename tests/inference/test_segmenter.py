"""``Segmenter``: masks for boxes from a small random SAM 2.1 (and SAM) model saved in the Hugging Face layout.

The masks must be the model's own decode of the scaled boxes, resized to the image as the
processor's ``post_process_masks`` does and thresholded at 0; memory must stay bounded on a large
image with many boxes; boxes outside the image are clipped; no boxes give empty masks.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gdino.checkpoint.convert_sam import ours_to_hf as sam_to_hf
from gdino.checkpoint.convert_sam2 import ours_to_hf
from gdino.inference.masks import Masks
from gdino.inference.segmenter import Segmenter, load_segmenter
from gdino.models.sam.config import SamConfig, SamVisionConfig
from gdino.models.sam.model import Sam
from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.model import Sam2, Sam2Output
from gdino.processing.sam2_processor import Sam2Processor
from gdino.processing.sam_processor import SamProcessor
from gdino.utils.hub import CheckpointError

S = 128


def perturb_(model: torch.nn.Module, seed: int = 1) -> None:
    """Seeded noise on every parameter, so that the random model's masks are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() < 2 else 1 / math.sqrt(p[0].numel())))


def save_hf(model: torch.nn.Module, config: dict, directory: Path, to_hf) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.clone().contiguous() for k, v in to_hf(model.state_dict()).items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = replace(Sam2Config.shapes(), image_size=S)
    model = Sam2(config).eval()
    perturb_(model)
    return save_hf(model, config.to_hf_dict(), tmp_path_factory.mktemp("seg") / "sam2", ours_to_hf)


@pytest.fixture(scope="module")
def segmenter(sam2_dir) -> Segmenter:
    return Segmenter.from_pretrained(sam2_dir)


def image(width: int = 200, height: int = 150, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_masks(seg: Segmenter, processor, picture: Image.Image, boxes: np.ndarray) -> tuple[np.ndarray, ...]:
    """What the processor and the model give for the boxes, the transformers way: (N, H, W) masks,
    (N,) scores and the (N, H, W) logits."""
    inputs = processor(images=picture, input_boxes=[boxes.tolist()])
    model = seg.model
    with torch.no_grad():
        if isinstance(model, Sam2):
            out = model.decode(
                model.encode_image(inputs["pixel_values"]), boxes=inputs["input_boxes"].float(), multimask_output=False
            )
        else:
            out = model(
                pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"].float(), multimask_output=False
            )
    extra = [inputs["reshaped_input_sizes"]] if "reshaped_input_sizes" in inputs else []
    logits = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], *extra, binarize=False)[0][:, 0]
    return (logits > 0).numpy(), out.iou_scores[0, :, 0].numpy(), logits.numpy()


def assert_same_masks(masks: Masks, expected: np.ndarray, logits: np.ndarray) -> None:
    dense = masks.dense()
    assert dense.shape == expected.shape
    differ = dense != expected
    # Only pixels whose logit is zero to float rounding may fall either way.
    assert not differ.any() or np.abs(logits[differ]).max() < 1e-5
    assert expected.any() and (~expected).any()  # the comparison is not trivial


@pytest.mark.parametrize("shape", [(32, 32, 300, 500), (256, 256, 3000, 4000), (16, 20, 7, 9), (96, 96, 1000, 333)])
def test_resizing_only_the_positive_part_equals_a_full_resize(shape) -> None:
    import torch.nn.functional as F

    from gdino.inference.mask_resize import resize_positive

    h, w, height, width = shape
    logits = torch.randn(h, w, generator=torch.Generator().manual_seed(h + w)) - 1.0
    full = F.interpolate(logits[None, None], (height, width), mode="bilinear", align_corners=False)[0, 0]
    crop, offset = resize_positive(logits.numpy(), (height, width))
    mask = Masks.from_crops([(crop, offset)], (width, height)).mask(0)
    differ = mask != (full > 0).numpy()
    assert not differ.any() or full.abs().numpy()[differ].max() < 1e-5  # float rounding at 0 only
    assert mask.any()
    assert resize_positive(np.full((8, 8), -1, np.float32), (50, 50))[0].shape == (0, 0)


def test_masks_are_the_models_decode_resized_to_the_image(segmenter) -> None:
    picture = image(200, 150)
    boxes = np.array([[10, 20, 120, 100], [50, 5, 190, 140], [0, 0, 200, 150]], np.float64)
    masks, scores = segmenter.segment(picture, boxes)
    expected, iou, logits = reference_masks(segmenter, Sam2Processor(segmenter.settings), picture, boxes)
    assert len(masks) == 3 and masks.image_size == (200, 150)
    assert_same_masks(masks, expected, logits)
    np.testing.assert_allclose(scores, iou, atol=1e-6)
    assert scores.dtype == np.float32


def test_batches_give_the_same_masks(sam2_dir, segmenter) -> None:
    picture = image(90, 160, seed=4)
    boxes = np.array([[5, 5, 60, 80], [20, 40, 85, 150], [0, 100, 50, 159], [30, 0, 90, 60], [1, 1, 3, 3]], float)
    one_by_one = Segmenter.from_pretrained(sam2_dir, batch_size=2)
    a, sa = segmenter.segment(picture, boxes)
    b, sb = one_by_one.segment(picture, boxes)
    assert all(np.array_equal(x, y) for x, y in zip(a.crops, b.crops))
    np.testing.assert_allclose(sa, sb, atol=1e-5)


def test_the_image_is_encoded_once_for_all_boxes(sam2_dir, monkeypatch) -> None:
    seg = Segmenter.from_pretrained(sam2_dir, batch_size=3)
    calls = {"encode": 0, "decode": []}
    encode, decode = seg.model.encode_image, seg.model.decode

    def counting_encode(pixels):
        calls["encode"] += 1
        return encode(pixels)

    def counting_decode(embeddings, **kw):
        calls["decode"].append(kw["boxes"].shape[1])
        return decode(embeddings, **kw)

    monkeypatch.setattr(seg.model, "encode_image", counting_encode)
    monkeypatch.setattr(seg.model, "decode", counting_decode)
    seg.segment(image(), np.tile([[10, 10, 90, 90]], (7, 1)))
    assert calls == {"encode": 1, "decode": [3, 3, 1]}


def test_boxes_outside_the_image_are_clipped(segmenter) -> None:
    picture = image(200, 150, seed=2)
    outside = np.array([[-50, -30, 120, 100], [150, 100, 400, 300]], float)
    inside = np.array([[0, 0, 120, 100], [150, 100, 200, 150]], float)
    a, sa = segmenter.segment(picture, outside)
    b, sb = segmenter.segment(picture, inside)
    assert all(np.array_equal(x, y) for x, y in zip(a.crops, b.crops))
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_allclose(sa, sb)


def test_no_boxes_give_empty_masks(segmenter) -> None:
    for boxes in (np.zeros((0, 4)), []):
        masks, scores = segmenter.segment(image(), boxes)
        assert len(masks) == 0 and masks.image_size == (200, 150) and scores.shape == (0,)


def test_bad_boxes_are_refused(segmenter) -> None:
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\)"):
        segmenter.segment(image(), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="not a finite number"):
        segmenter.segment(image(), [[0, 0, float("nan"), 4]])


def test_add_masks_fills_detections(segmenter) -> None:
    from gdino.inference.detections import Detections

    found = Detections(
        np.array([[10, 10, 80, 90]], np.float32), np.array([0.9], np.float32), ("cat",), np.array([0]), (200, 150)
    )
    out = segmenter.add_masks(image(), found)
    assert out.masks is not None and len(out.masks) == 1 and out.mask_scores.shape == (1,)
    assert out.boxes is found.boxes and out.labels == ("cat",)


def box_logits(boxes: torch.Tensor, side: int) -> torch.Tensor:
    """(1, P, 1, side, side) logits positive inside each box (boxes in pixels of the model's 4x larger input)."""
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) * 4  # (side,) input pixels of each low-res centre
    x0, y0, x1, y1 = (boxes[0, :, i, None] for i in range(4))  # (P, 1)
    inside_x = torch.minimum(grid - x0, x1 - grid)  # (P, side)
    inside_y = torch.minimum(grid - y0, y1 - grid)
    return torch.minimum(inside_x[:, None, :], inside_y[:, :, None])[None, :, None]  # (1, P, 1, side, side)


@pytest.mark.slow  # 200 boxes decoded and resized on a 12-megapixel image: about 10-25 s on 2 cores
def test_200_boxes_on_a_4000x3000_image_stay_bounded(sam2_dir, monkeypatch) -> None:
    """The model is the small random one with its decoder's logits replaced by box-shaped ones, so that
    the masks are as large as their boxes (random weights may fill the image); what is measured is the
    segmenter's part: numpy memory (tracemalloc) and what the masks keep."""
    seg = Segmenter.from_pretrained(sam2_dir)
    decode = seg.model.decode

    def box_decode(embeddings, boxes, multimask_output):
        out = decode(embeddings, boxes=boxes, multimask_output=multimask_output)
        return Sam2Output(box_logits(boxes, out.pred_masks.shape[-1]), out.iou_scores, out.object_score_logits)

    monkeypatch.setattr(seg.model, "decode", box_decode)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [3600, 2700], (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(50, 400, (200, 2))], axis=1)
    picture = Image.new("RGB", (4000, 3000), (90, 120, 150))
    tracemalloc.start()
    try:
        masks, scores = seg.segment(picture, boxes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(masks) == 200 and scores.shape == (200,)
    stored = sum(c.nbytes for c in masks.crops)
    box_area = float(np.prod(np.minimum(boxes[:, 2:], [4000, 3000]) - boxes[:, :2], axis=1).sum())
    print(f"stored {stored / 1e6:.1f} MB, numpy peak {peak / 1e6:.1f} MB, boxes {box_area / 1e6:.1f} Mpx")
    assert 0.5 * box_area < stored < 1.5 * box_area  # each mask is about its box, nothing more
    assert stored < 40e6 and peak < 150e6  # dense bool masks would take 2.4 GB, float logits 9.6 GB
    i = int(np.argmax(boxes[:, 2] - boxes[:, 0]))
    x0, y0 = masks.offsets[i]
    assert abs(x0 - boxes[i, 0]) <= 24 and abs(y0 - boxes[i, 1]) <= 24  # at its box (one low-res pixel)


def test_sam_checkpoints_segment_too(tmp_path) -> None:
    vision = SamVisionConfig(
        width=32, depth=2, num_heads=2, mlp_dim=64, image_size=S, patch_size=16, window_size=4, global_attn_indexes=(1,)
    )
    config = replace(
        SamConfig.vit_b(), vision=vision, prompt_dim=32, decoder_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32
    )
    torch.manual_seed(0)
    model = Sam(config).eval()
    perturb_(model)
    directory = save_hf(model, config.to_hf_dict(), tmp_path / "sam", sam_to_hf)
    seg = load_segmenter(directory)
    assert isinstance(seg.model, Sam) and not seg.settings.square
    picture = image(160, 100, seed=5)
    boxes = np.array([[10, 10, 100, 90], [60, 0, 160, 100]], float)
    masks, scores = seg.segment(picture, boxes)
    expected, iou, logits = reference_masks(seg, SamProcessor(seg.settings), picture, boxes)
    assert_same_masks(masks, expected, logits)
    np.testing.assert_allclose(scores, iou, atol=1e-6)


def test_other_families_and_truncated_files_are_refused(sam2_dir, tmp_path) -> None:
    shapes = Path(__file__).parents[2] / "src" / "gdino" / "data" / "gdino-shapes"  # a Grounding DINO
    with pytest.raises(CheckpointError, match="model_type 'grounding-dino', not a segmenter's"):
        Segmenter.from_pretrained(shapes)
    (tmp_path / "detector.safetensors").write_bytes((shapes / "model.safetensors").read_bytes())  # no config.json
    with pytest.raises(CheckpointError, match=r"is not a SAM 2\.1, SAM or SAM-HQ checkpoint: its tensors"):
        Segmenter.from_pretrained(tmp_path / "detector.safetensors")
    data = (sam2_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_bytes((sam2_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        Segmenter.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Segmenter.from_pretrained(tmp_path / "nothing.pt")


def test_the_packaged_name_resolves_or_says_it_is_missing() -> None:
    from gdino.utils.hub import PACKAGED_MODELS, packaged_model_dir

    assert "gdino-shapes-sam" in PACKAGED_MODELS
    directory = Path(__file__).parents[2] / "src" / "gdino" / "data" / "gdino-shapes-sam"
    if (directory / "model.safetensors").is_file():
        assert packaged_model_dir("gdino-shapes-sam") == directory.resolve()
        assert isinstance(Segmenter.from_pretrained("gdino-shapes-sam").model, Sam2)
    else:
        with pytest.raises(CheckpointError, match="'gdino-shapes-sam' is missing from this install"):
            Segmenter.from_pretrained("gdino-shapes-sam")


@pytest.mark.slow  # the detector runs five times: about 10 s on 2 cores
def test_detect_with_a_segmenter_gives_masks(fast_model, segmenter, data_dir) -> None:
    path = str(data_dir / "chelsea.png")
    everything = fast_model.detect(path, "a cat.", box_threshold=0.0, text_threshold=0.0)
    threshold = float(np.sort(everything.scores)[-6])  # the best five boxes or so
    plain = fast_model.detect(path, "a cat.", box_threshold=threshold, text_threshold=0.0)
    found = fast_model.detect(path, "a cat.", box_threshold=threshold, text_threshold=0.0, segmenter=segmenter)
    assert len(found) == len(plain) > 0 and found.masks is not None and found.mask_scores is not None
    np.testing.assert_array_equal(found.boxes, plain.boxes)
    masks, scores = segmenter.segment(path, plain.boxes)
    assert all(np.array_equal(a, b) for a, b in zip(found.masks.crops, masks.crops))
    np.testing.assert_allclose(found.mask_scores, scores)
    none = fast_model.detect([path], "a cat.", box_threshold=1.0, segmenter=segmenter)[0]
    assert len(none) == 0 and none.masks is not None and len(none.masks) == 0
    with pytest.raises(ValueError, match="needs the images themselves"):
        fast_model.detect(fast_model.encode_image(path), "a cat.", segmenter=segmenter)


def test_original_layout_files_give_the_same_masks(sam2_dir, segmenter, tmp_path) -> None:
    """SAM 2.1's original ``{"model": state_dict}`` .pt (with the folder's config.json: the small model
    is no published size to read from its tensors) and a SAM .pth alone, against the HF layout."""
    from gdino.checkpoint.convert_sam2 import ours_to_original

    original = tmp_path / "sam2"
    original.mkdir()
    (original / "config.json").write_bytes((sam2_dir / "config.json").read_bytes())
    torch.save({"model": ours_to_original(segmenter.model.state_dict())}, original / "sam2.1_small.pt")
    picture, boxes = image(seed=7), np.array([[10, 20, 150, 140], [100, 0, 200, 60]], float)
    a, sa = segmenter.segment(picture, boxes)
    b, sb = Segmenter.from_pretrained(original).segment(picture, boxes)
    assert all(np.array_equal(x, y) for x, y in zip(a.crops, b.crops))
    np.testing.assert_allclose(sa, sb, atol=1e-6)
