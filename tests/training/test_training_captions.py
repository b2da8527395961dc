"""Training captions: positives and sampled negatives within the token limit, phrase tokens per box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS
from gdino.processing.text import TextTokenizer, phrase_spans
from gdino.training.captions import CaptionBuilder
from gdino.training.samples import Phrase, Sample

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
NAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.from_vocab()


def _ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    return tokenizer.encode([text]).input_ids[0].tolist()


def test_detection_caption_holds_every_positive_and_phrases_match_the_prompt_tokens(tokenizer):
    builder = CaptionBuilder(tokenizer, NAMES, max_labels=10)
    box_labels = [3, 17, 3, 8]
    caption = builder.detection(box_labels, np.random.default_rng(0))
    assert len(caption.phrases) == 10
    assert {NAMES[i] for i in box_labels} <= set(caption.phrases)
    assert caption.text == ". ".join(caption.phrases) + "."
    assert caption.kept == (0, 1, 2, 3)
    assert [caption.phrases[p] for p in caption.box_labels] == [NAMES[i] for i in box_labels]
    assert [NAMES[i] for i in caption.label_ids] == list(caption.phrases)
    # the rows of the positive map are the phrases the model (and transformers' loss) sees between "."s
    ids = _ids(tokenizer, caption.text)
    spans = phrase_spans(ids, SPECIAL_TOKEN_IDS)
    assert [tuple(range(s, e)) for s, e in spans] == list(caption.tokens)
    positive = caption.positive_map(256)
    assert positive.shape == (10, 256) and positive.sum() == sum(e - s for s, e in spans)
    for row, phrase in zip(positive, caption.phrases):
        assert tokenizer.decode([ids[i] for i in np.flatnonzero(row)]) == phrase


def test_detection_caption_is_seeded_and_shuffled(tokenizer):
    builder = CaptionBuilder(tokenizer, NAMES, max_labels=8)
    one = builder.detection([0, 1], np.random.default_rng(5))
    assert builder.detection([0, 1], np.random.default_rng(5)) == one
    others = {builder.detection([0, 1], np.random.default_rng(seed)).text for seed in range(20)}
    assert len(others) == 20  # negatives and order vary with the seed
    positions = {builder.detection([0, 1], np.random.default_rng(s)).phrases.index("red circle") for s in range(20)}
    assert len(positions) > 3  # positives are not always first


def test_long_label_lists_never_pass_256_tokens_nor_cut_a_label(tokenizer):
    names = [f"very unusual category number {k} of many" for k in range(500)]
    builder = CaptionBuilder(tokenizer, names, max_labels=80)
    for seed in range(5):
        caption = builder.detection([7, 450], np.random.default_rng(seed))
        ids = _ids(tokenizer, caption.text)
        assert len(ids) <= 256
        assert len(caption.phrases) == len(phrase_spans(ids, SPECIAL_TOKEN_IDS)) < 80
        assert names[7] in caption.phrases and names[450] in caption.phrases
        assert all(p in names for p in caption.phrases)  # whole labels only
        # the next label would not have fitted
        assert len(ids) + 1 + builder.sizes[0] > 256


def test_positives_that_cannot_fit_leave_with_their_boxes(tokenizer):
    names = [" ".join(f"w{k}x{j}" for j in range(12)) for k in range(12)]  # long labels
    builder = CaptionBuilder(tokenizer, names)
    size = builder.sizes[0] + 1
    fit = (256 - 2) // size
    box_labels = list(range(12))
    caption = builder.detection(box_labels, np.random.default_rng(0))
    assert len(caption.phrases) == fit < 12
    assert len(_ids(tokenizer, caption.text)) <= 256
    assert len(caption.kept) == fit
    assert [caption.phrases[p] for p in caption.box_labels] == [names[box_labels[k]] for k in caption.kept]


def test_grounding_caption_is_kept_with_each_phrase_tokens(tokenizer):
    caption_text = "A man holding a red umbrella next to a man in a hat"
    phrases = (Phrase("A man", ((0, 5),)), Phrase("a red umbrella", ((14, 28),)), Phrase("a man in a hat", ((37, 51),)))
    sample = Sample(Path("x.jpg"), 10, 10, np.zeros((3, 4), np.float32), (1, 0, 2), caption_text, phrases)
    caption = CaptionBuilder(tokenizer)(sample, np.random.default_rng(0))
    assert caption.text == caption_text + "."
    ids = _ids(tokenizer, caption.text)
    assert [tokenizer.decode([ids[i] for i in t]) for t in caption.tokens] == [
        "a man",
        "a red umbrella",
        "a man in a hat",
    ]
    assert caption.box_labels == (1, 0, 2) and caption.kept == (0, 1, 2)


def test_grounding_caption_over_the_limit_is_cut_and_late_phrases_leave(tokenizer):
    text = "the cat " + "and more words " * 100 + "a dog"
    phrases = (Phrase("the cat", ((0, 7),)), Phrase("a dog", ((len(text) - 5, len(text)),)))
    sample = Sample(Path("x.jpg"), 10, 10, np.zeros((3, 4), np.float32), (1, 0, 1), text, phrases)
    caption = CaptionBuilder(tokenizer).grounding(sample)
    assert len(_ids(tokenizer, caption.text)) <= 256
    assert text.startswith(caption.text[:-1])
    assert caption.phrases == ("the cat",) and caption.kept == (1,) and caption.box_labels == (0,)
