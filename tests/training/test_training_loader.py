"""From a data set to model inputs: seeded examples, resumable order, and the collate's tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS
from gdino.processing.image import ImageSettings
from gdino.processing.processor import GroundingDinoProcessor
from gdino.processing.text import TextTokenizer, phrase_spans
from gdino.training.augment import Augment, AugmentSettings
from gdino.training.captions import CaptionBuilder
from gdino.training.datasets import read_coco
from gdino.training.loader import batches, collate, epoch_order, examples
from gdino.training.samples import Problem

NAMES = ["red square", "blue square", "cat", "traffic light", "dog"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(6):
        w, h = 96 + 8 * i, 64 + 4 * i
        arr = np.full((h, w, 3), 200, dtype=np.uint8)
        x, y = 5 + i, 7 + i
        arr[y : y + 20, x : x + 30] = (255, 0, 0)
        Image.fromarray(arr).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 10, "bbox": [x, y, 30, 20]})
        if i % 2:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": 30,
                    "bbox": [int(rng.integers(40, 60)), 30, 20, 20],
                }
            )
    categories = [{"id": 10 * (k + 1), "name": n} for k, n in enumerate(NAMES)]
    (root / "train.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return read_coco(root / "train.json")


@pytest.fixture(scope="module")
def processor():
    return GroundingDinoProcessor(TextTokenizer.from_vocab(), ImageSettings(shortest_edge=128, longest_edge=256))


def test_epoch_order_is_fixed_by_seed_and_epoch():
    assert sorted(epoch_order(10, 0, 0).tolist()) == list(range(10))
    np.testing.assert_array_equal(epoch_order(10, 3, 1), epoch_order(10, 3, 1))
    assert epoch_order(10, 3, 1).tolist() != epoch_order(10, 3, 2).tolist()
    assert epoch_order(5, 3, 1, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_examples_are_seeded_and_a_restart_sees_the_same_tail(dataset, processor):
    captions = CaptionBuilder(processor.tokenizer, dataset.names, max_labels=4)
    augment = Augment(AugmentSettings.scaled(0.2))
    full = list(examples(dataset, captions, augment, seed=7, epoch=2))
    assert len(full) == 6
    tail = list(examples(dataset, captions, augment, seed=7, epoch=2, start=4))
    assert [e.index for e in tail] == [e.index for e in full[4:]]
    for a, b in zip(tail, full[4:]):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.caption == b.caption
    other = list(examples(dataset, captions, augment, seed=8, epoch=2))
    assert [e.caption.text for e in other] != [e.caption.text for e in full]


def test_collate_gives_the_processor_tensors_and_transformers_labels(dataset, processor):
    captions = CaptionBuilder(processor.tokenizer, dataset.names, max_labels=3)
    batch = list(examples(dataset, captions, None, seed=1, shuffle=False))[:3]
    inputs, labels = collate(batch, processor, resize=True)
    reference = processor(images=[ex.image for ex in batch], text=[ex.caption.text for ex in batch])
    assert min(inputs["pixel_values"].shape[-2:]) == 128
    assert set(inputs) == {"pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids"}
    for key in inputs:
        torch.testing.assert_close(inputs[key], reference[key], rtol=0, atol=0)
    for ex, target, ids in zip(batch, labels, inputs["input_ids"]):
        sample = dataset[ex.index]
        h, w = sample.height, sample.width
        x0, y0, x1, y1 = sample.boxes.T
        expected = np.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], -1)
        assert target["boxes"].dtype == torch.float32 and target["class_labels"].dtype == torch.long
        torch.testing.assert_close(target["boxes"], torch.from_numpy(expected))
        # class labels index the caption's phrases, as transformers' loss reads them from input_ids
        spans = phrase_spans(ids, SPECIAL_TOKEN_IDS)
        phrases = [processor.decode(ids[s:e]) for s, e in spans]
        assert [phrases[c] for c in target["class_labels"].tolist()] == [dataset.names[k] for k in sample.labels]
        assert target["positive_map"].shape == (len(spans), 256)
        for row, (s, e) in zip(target["positive_map"], spans):
            assert torch.nonzero(row).flatten().tolist() == list(range(s, e))


def test_augmented_batches_are_not_resized_again(dataset, processor):
    captions = CaptionBuilder(processor.tokenizer, dataset.names)
    augment = Augment(AugmentSettings.scaled(0.2, crop_prob=0.0, flip_prob=1.0))
    batch = next(batches(examples(dataset, captions, augment, seed=0), 2))
    inputs, labels = collate(batch, processor)
    assert inputs["pixel_values"].shape[-2:] == tuple(max(ex.image.shape[i] for ex in batch) for i in (0, 1))
    for i, ex in enumerate(batch):
        h, w = ex.image.shape[:2]
        assert min(h, w) in augment.settings.scales
        assert inputs["pixel_mask"][i].sum() == h * w
        red = labels[i]["boxes"][labels[i]["class_labels"] == ex.caption.phrases.index("red square")][0]
        x0, x1 = (red[0] - red[2] / 2) * w, (red[0] + red[2] / 2) * w
        cols = np.flatnonzero((ex.image[..., 0].astype(int) - ex.image[..., 1] > 100).any(0))
        assert abs(cols.min() - float(x0)) <= 1.0 and abs(cols.max() + 1 - float(x1)) <= 1.0


def test_an_unreadable_image_is_reported_and_skipped(dataset, processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"garbage")
    from dataclasses import replace

    bad = replace(dataset, samples=(replace(dataset[0], image=broken), *dataset.samples[1:]))
    captions = CaptionBuilder(processor.tokenizer, dataset.names)
    problems: list[Problem] = []
    got = list(examples(bad, captions, seed=0, on_problem=problems.append))
    assert len(got) == 5 and 0 not in [e.index for e in got]
    assert len(problems) == 1 and str(broken) in str(problems[0]) and "skipped: cannot read" in str(problems[0])


def test_grounding_records_collate_with_their_caption_and_phrase_tokens(tmp_path, processor):
    from gdino.training.odvg import read_odvg

    Image.new("RGB", (80, 60), (50, 60, 70)).save(tmp_path / "g.png")
    record = {
        "filename": "g.png",
        "width": 80,
        "height": 60,
        "grounding": {
            "caption": "a red circle next to the big blue square",
            "regions": [
                {"bbox": [40, 10, 70, 40], "phrase": "the big blue square"},
                {"bbox": [5, 5, 25, 25], "phrase": "a red circle"},
            ],
        },
    }
    (tmp_path / "g.jsonl").write_text(json.dumps(record) + "\n")
    data = read_odvg(tmp_path / "g.jsonl")
    captions = CaptionBuilder(processor.tokenizer, data.names)
    inputs, labels = collate(list(examples(data, captions, None, seed=0)), processor, resize=True)
    ids = inputs["input_ids"][0]
    assert processor.decode(ids, skip_special_tokens=True) == "a red circle next to the big blue square."
    target = labels[0]
    assert target["class_labels"].tolist() == [1, 0]  # phrases in caption order: "a red circle", then the square
    rows = [torch.nonzero(r).flatten().tolist() for r in target["positive_map"]]
    assert [processor.decode(ids[r]) for r in rows] == ["a red circle", "the big blue square"]
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[55 / 80, 25 / 60, 30 / 80, 30 / 60], [15 / 80, 15 / 60, 20 / 80, 20 / 60]])
    )
