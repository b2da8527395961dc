"""``GroundingDinoForObjectDetection.detect`` on the small random-weight checkpoint.

Checked: labels are whole prompt phrases (also for words BERT splits into ``##`` pieces), label
ids index the prompt's phrases / the label list, scores are sorted and above the threshold, boxes
are the raw outputs converted to pixels, results do not depend on the rest of the batch, and bad
input raises ``PromptError`` / ``ImageError``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gdino import Detections, GroundingDinoForObjectDetection, ImageError, PromptError

PROMPT = "a cat. a remote control."
PHRASES = ("a cat", "a remote control")
THRESHOLD = 0.6  # the random model scores its queries ~0.5-0.9: some boxes kept, some dropped
BATCH = ("chelsea.png", "coffee.png", "astronaut.png")  # 451x300, 600x400, 512x512: the batch is padded


@pytest.fixture(scope="module")
def images(data_dir) -> dict[str, Image.Image]:
    return {name: Image.open(data_dir / name).convert("RGB") for name in BATCH}


@pytest.fixture(scope="module")
def singles(small_model, images, data_dir) -> dict[str, Detections]:
    """Each image alone, every query kept (chelsea given as a file path, the others as PIL images)."""
    out = {
        "chelsea.png": small_model.detect(str(data_dir / "chelsea.png"), PROMPT, box_threshold=0.0, text_threshold=0.0)
    }
    for name in BATCH[1:]:
        out[name] = small_model.detect(images[name], PROMPT, box_threshold=0.0, text_threshold=0.0)
    return out


@pytest.fixture(scope="module")
def raw_singles(small_model, images) -> dict[str, tuple[torch.Tensor, ...]]:
    """(logits, pred_boxes, input_ids, query_index) of the model on each image alone."""
    out = {}
    with torch.inference_mode():
        for name in ("chelsea.png", "astronaut.png"):
            inputs = small_model.processor(images=images[name], text=PROMPT)
            res = small_model(**inputs)
            out[name] = (res.logits[0], res.pred_boxes[0], inputs["input_ids"][0], res.query_index[0])
    return out


def _check_detections(det: Detections, phrases, size, threshold) -> None:
    n = len(det)
    assert n > 0
    assert det.boxes.shape == (n, 4) and det.boxes.dtype == np.float32
    assert det.scores.shape == (n,) and det.label_ids.shape == (n,)
    assert det.label_ids.dtype == np.int64
    assert det.image_size == size
    assert set(det.labels) <= set(phrases)
    assert all(phrases[i] == label for i, label in zip(det.label_ids, det.labels))
    assert np.all(np.diff(det.scores) <= 0), "scores not sorted best first"
    assert np.all(det.scores > threshold) and np.all(det.scores <= 1)
    width, height = size
    x0, y0, x1, y1 = det.boxes.T
    assert np.all(x0 <= x1) and np.all(y0 <= y1)
    # cx, cy, w, h are sigmoids in [0, 1]: centres inside the image, corners at most half an image out
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    assert np.all((cx >= 0) & (cx <= width) & (cy >= 0) & (cy <= height))
    assert np.all((x0 >= -width / 2) & (x1 <= 1.5 * width) & (y0 >= -height / 2) & (y1 <= 1.5 * height))


# --------------------------------------------------------------------------- labels, scores, boxes


def test_string_prompt(small_model, singles, images):
    for name, det in singles.items():
        assert len(det) == small_model.config.num_queries  # every query scores above 0
        _check_detections(det, PHRASES, images[name].size, 0.0)


def test_matches_raw_model_outputs(small_model, singles, raw_singles, images):
    """Every query's score, box (cxcywh * size -> xyxy) and label, recomputed from the raw outputs."""
    det = singles["chelsea.png"]
    logits, pred_boxes, input_ids, _ = raw_singles["chelsea.png"]
    # [CLS] a cat . a remote control . [SEP]: phrase 0 = tokens 1..2, phrase 1 = tokens 4..6
    assert input_ids.tolist() == [101, 1037, 4937, 1012, 1037, 6556, 2491, 1012, 102]
    probs = logits.sigmoid()
    best = probs.max(-1).values
    kept = best.argsort(descending=True)
    assert len(det) == len(kept)
    np.testing.assert_allclose(det.scores, best[kept].numpy(), atol=1e-6)
    width, height = images["chelsea.png"].size
    cx, cy, w, h = pred_boxes[kept].unbind(-1)
    expected = torch.stack(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1
    )
    np.testing.assert_allclose(det.boxes, expected.numpy(), atol=1e-3)
    phrase_best = torch.stack([probs[kept, 1:3].max(-1).values, probs[kept, 4:7].max(-1).values], -1)
    assert det.label_ids.tolist() == phrase_best.argmax(-1).tolist()
    # the top detection, spelled out
    q = int(best.argmax())
    box = pred_boxes[q].tolist()
    top = [
        (box[0] - box[2] / 2) * width,
        (box[1] - box[3] / 2) * height,
        (box[0] + box[2] / 2) * width,
        (box[1] + box[3] / 2) * height,
    ]
    np.testing.assert_allclose(det.boxes[0], top, atol=1e-3)
    assert det.scores[0] == pytest.approx(float(best[q]), abs=1e-6)


def test_matches_processor_post_processing(small_model, singles, raw_singles, images):
    """detect and transformers-style post-processing keep the same boxes with the same scores."""
    logits, pred_boxes, input_ids, _ = raw_singles["astronaut.png"]
    width, height = images["astronaut.png"].size
    post = small_model.processor.post_process_grounded_object_detection(
        {"logits": logits[None], "pred_boxes": pred_boxes[None]},
        input_ids[None],
        threshold=THRESHOLD,
        target_sizes=[(height, width)],
    )[0]
    order = post["scores"].argsort(descending=True)
    det = singles["astronaut.png"]
    keep = det.scores > THRESHOLD
    assert 0 < keep.sum() < len(det)
    np.testing.assert_allclose(det.scores[keep], post["scores"][order].numpy(), atol=1e-6)
    np.testing.assert_allclose(det.boxes[keep], post["boxes"][order].numpy(), atol=1e-3)


def test_box_threshold_filters(small_model, images, singles):
    """A threshold keeps exactly the detections scoring above it, in the same order."""
    det = singles["coffee.png"]
    high = small_model.detect(images["coffee.png"], PROMPT, box_threshold=THRESHOLD)
    _check_detections(high, PHRASES, images["coffee.png"].size, THRESHOLD)
    keep = det.scores > THRESHOLD
    assert 0 < len(high) < len(det)
    np.testing.assert_allclose(high.scores, det.scores[keep], atol=1e-6)
    np.testing.assert_allclose(high.boxes, det.boxes[keep], atol=1e-3)
    assert high.labels == tuple(np.array(det.labels, dtype=object)[keep])


def test_label_list_ids_index_the_list(small_model, images):
    labels = ["cat", "remote control", "kookaburra"]
    det = small_model.detect(images["chelsea.png"], labels, box_threshold=0.0, text_threshold=0.0)
    assert len(det) == small_model.config.num_queries  # every query scores above 0
    _check_detections(det, labels, images["chelsea.png"].size, 0.0)
    assert [labels[i] for i in det.label_ids] == list(det.labels)
    assert len(set(det.labels)) >= 2


def test_word_pieces_come_back_whole(small_model, images):
    """BERT splits kookaburra and thermos into ## pieces; labels are still the whole phrases."""
    prompt = "a kookaburra. a thermos."
    tokens = small_model.processor.tokenizer._tok.encode(prompt).tokens
    assert sum(t.startswith("##") for t in tokens) >= 4, tokens
    det = small_model.detect(images["astronaut.png"], prompt, box_threshold=0.0)
    assert len(det) == small_model.config.num_queries
    assert set(det.labels) == {"a kookaburra", "a thermos"}
    assert all(("##" not in label and label not in (".", "[SEP]", "[CLS]")) for label in det.labels)
    assert all(("a kookaburra", "a thermos")[i] == label for i, label in zip(det.label_ids, det.labels))


def test_phrases_are_the_prompt_as_written(small_model):
    """Phrase texts come from the prompt, not from re-joined tokens ("t - shirt")."""
    assert small_model.phrases("A Cat. a remote control") == ["a cat", "a remote control"]
    assert small_model.phrases(["T-shirt", "rock'n'roll", "kookaburra"]) == [
        "T-shirt",
        "rock'n'roll",
        "kookaburra",
    ]  # as given
    assert small_model.phrases("a cat.. a dog.") == ["a cat", "a dog"]


# --------------------------------------------------------------------------- batches


@pytest.mark.slow  # a batch and each image alone at 800 pixels
def test_batch_equals_single_images(small_model, images, singles):
    """All 50 queries compared (boxes relative to the image size, as the raw outputs are)."""
    batch = small_model.detect([images[name] for name in BATCH], PROMPT, box_threshold=0.0, text_threshold=0.0)
    assert isinstance(batch, list) and len(batch) == len(BATCH)
    for name, det in zip(BATCH, batch):
        alone = singles[name]
        assert det.image_size == alone.image_size == images[name].size
        assert det.labels == alone.labels, name
        np.testing.assert_array_equal(det.label_ids, alone.label_ids)
        np.testing.assert_allclose(det.scores, alone.scores, atol=1e-4, rtol=0)
        scale = np.tile(images[name].size, 2)  # (W, H, W, H)
        np.testing.assert_allclose(det.boxes / scale, alone.boxes / scale, atol=1e-4, rtol=0)


@pytest.mark.slow  # a batch and each image alone at 800 pixels
def test_padded_batch_raw_outputs_equal_single(small_model, images, raw_singles):
    names = ("chelsea.png", "astronaut.png")  # 800x1202 and 800x800 after resizing
    inputs = small_model.processor(images=[images[n] for n in names], text=PROMPT)
    assert inputs["pixel_mask"][1].float().mean() < 0.7  # astronaut is heavily padded
    # The same selected image tokens as alone: batched and single matrix products round apart,
    # which could swap near-tied proposals on some CPUs (detect runs images one by one for this).
    with torch.inference_mode():
        index = torch.stack([_in_batch(small_model, inputs, i, raw_singles[n][3]) for i, n in enumerate(names)])
        out = small_model(**inputs, query_index=index)
    for i, name in enumerate(names):
        logits, pred_boxes, _, _ = raw_singles[name]
        finite = torch.isfinite(logits)
        assert torch.equal(finite, torch.isfinite(out.logits[i]))
        torch.testing.assert_close(out.logits[i][finite], logits[finite], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.pred_boxes[i], pred_boxes, atol=1e-4, rtol=0)


def _level_shapes(small_model, pixel_values) -> list[tuple[int, int]]:
    return [tuple(m.shape[-2:]) for m in small_model.image_features(pixel_values).maps]


def _in_batch(small_model, inputs, i: int, index: torch.Tensor) -> torch.Tensor:
    """Image tokens of image ``i`` alone (its flattened levels) -> the same tokens in the padded batch's levels."""
    h, w = (int(inputs["pixel_mask"][i].sum(d).max()) for d in (0, 1))
    alone = _level_shapes(small_model, inputs["pixel_values"][i : i + 1, :, :h, :w])
    batch = _level_shapes(small_model, inputs["pixel_values"][:1])
    out, start, batch_start = index.clone(), 0, 0
    for (ha, wa), (hb, wb) in zip(alone, batch):
        here = (index >= start) & (index < start + ha * wa)
        y, x = (index[here] - start) // wa, (index[here] - start) % wa
        out[here] = batch_start + y * wb + x
        start, batch_start = start + ha * wa, batch_start + hb * wb
    return out


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("prompt", ["", "   \n\t", ".", " . ? ", []])
def test_empty_prompt(small_model, images, prompt):
    with pytest.raises(PromptError, match=r"empty|no phrase"):
        small_model.detect(images["chelsea.png"], prompt)


def test_prompt_too_long(small_model, images):
    prompt = ". ".join(["a cat"] * 100)  # 302 tokens
    with pytest.raises(PromptError, match="256") as info:
        small_model.detect(images["chelsea.png"], prompt)
    assert "tokens" in str(info.value)
    # 254 words + [CLS] + [SEP] is exactly the limit, still fine
    assert small_model.phrases(" ".join(["cat"] * 253) + ".") == [" ".join(["cat"] * 253)]


def test_unreadable_image(small_model, data_dir, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageError, match=r"missing.png"):
        small_model.detect(missing, PROMPT)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ImageError, match=r"notes.png"):
        small_model.detect(str(text), PROMPT)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes((data_dir / "rocket.jpg").read_bytes()[:2000])
    with pytest.raises(ImageError, match=r"cut.jpg"):
        small_model.detect([data_dir / "chelsea.png", truncated], PROMPT)


# --------------------------------------------------------------------------- extreme shapes

EXTREME = [(1, 1), (1, 5000), (5000, 1), (5000, 10), (1333, 30), (3000, 40)]  # (width, height)


@pytest.fixture(scope="module")
def model900(tmp_path_factory) -> GroundingDinoForObjectDetection:
    """The small model with the published 900 queries: more than a 5000x10 image has tokens (~300)."""
    from reference import build_reference, save_reference, small_reference_config

    with torch.no_grad():
        reference = build_reference(small_reference_config(num_queries=900), seed=1)
    directory = save_reference(reference, tmp_path_factory.mktemp("small-900"))
    return GroundingDinoForObjectDetection.from_pretrained(directory)


@pytest.mark.slow  # six extreme shapes, each through the whole model
@pytest.mark.parametrize("size", EXTREME, ids=[f"{w}x{h}" for w, h in EXTREME])
def test_extreme_shapes_detect_with_as_many_queries_as_tokens(model900, size):
    """Images with fewer image tokens than num_queries decode one query per token, not crash."""
    model = model900
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    inputs = model.processor(images=image, text=PROMPT)
    with torch.inference_mode():
        out = model(**inputs)
        tokens = sum(m.numel() for m in model.image_features(inputs["pixel_values"]).masks)
    queries = min(model.config.num_queries, tokens)
    assert out.pred_boxes.shape == (1, queries, 4) and out.logits.shape == (1, queries, model.config.max_text_len)
    assert out.query_index.shape == (1, queries) and len(set(out.query_index[0].tolist())) == queries
    assert out.pred_boxes.isfinite().all() and not out.logits.isnan().any()
    found = model.detect(image, PROMPT, box_threshold=0.0, text_threshold=0.0)
    assert len(found) == queries and found.image_size == size
    assert np.isfinite(found.boxes).all()
    labelled = model.detect(image, ["cat", "remote control"], box_threshold=0.0, nms_threshold=0.5)
    assert 0 < len(labelled) <= queries
    post = model.processor.post_process_grounded_object_detection(
        out, inputs["input_ids"], threshold=0.0, target_sizes=[size[::-1]]
    )[0]
    assert len(post["scores"]) == queries


@pytest.mark.slow  # a padded batch and each image alone
def test_few_tokens_in_a_padded_batch_equal_the_image_alone(model900, images):
    """A 5000x10 image (fewer tokens than queries) beside a normal one: its queries are its own."""
    model = model900
    thin = Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 5000, 3), dtype=np.uint8))
    with torch.inference_mode():
        alone = model(**model.processor(images=thin, text=PROMPT))
        normal = model(**model.processor(images=images["chelsea.png"], text=PROMPT))
        inputs = model.processor(images=[images["chelsea.png"], thin], text=PROMPT)
        n = alone.query_index.shape[1]
        assert n < model.config.num_queries
        # thin's surplus queries on tokens that are padding for it, as free selection puts them
        masks = model.image_features(inputs["pixel_values"], inputs["pixel_mask"]).masks
        surplus = torch.nonzero(~torch.cat([m[1].flatten() for m in masks]))[: model.config.num_queries - n, 0]
        index = torch.stack(
            [
                _in_batch(model, inputs, 0, normal.query_index[0]),
                torch.cat([_in_batch(model, inputs, 1, alone.query_index[0]), surplus]),
            ]
        )
        out = model(**inputs, query_index=index)
    torch.testing.assert_close(out.pred_boxes[0], normal.pred_boxes[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pred_boxes[1, :n], alone.pred_boxes[0], atol=1e-4, rtol=0)
    finite = alone.logits[0].isfinite()
    torch.testing.assert_close(out.logits[1, :n][finite], alone.logits[0][finite], atol=1e-4, rtol=0)
    assert torch.isinf(out.logits[1, n:]).all() and (out.pred_boxes[1, n:] == 0).all()
