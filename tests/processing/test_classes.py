"""Class-level scoring, token spans, chunked label lists (LVIS-sized) and class-wise NMS.

Scores are recomputed here from the raw model outputs (``model(**inputs)``) with token positions
worked out from the token ids, not with ``gdino.processing.classes``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from gdino import PromptError
from gdino.inference.postprocess import box_iou, class_nms, nms
from gdino.processing.classes import ClassQuery, label_query, prompt_text, queries_for_images

DOT = 1012


@pytest.fixture(scope="module")
def image(data_dir) -> Image.Image:
    return Image.open(data_dir / "chelsea.png").convert("RGB")


def _raw(fast_model, image, prompt: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token probabilities (Q, 256), boxes (Q, 4) and token ids of the whole model on one image."""
    with torch.inference_mode():
        inputs = fast_model.processor(images=image, text=prompt)
        out = fast_model(**inputs)
    return out.logits[0].sigmoid(), out.pred_boxes[0], inputs["input_ids"][0].tolist()


def _phrase_positions(ids: list[int]) -> list[list[int]]:
    """Positions of each "."-separated phrase's tokens, [CLS] and [SEP] left out."""
    groups, current = [], []
    for i, token in enumerate(ids[1:-1], start=1):
        if token == DOT:
            groups.append(current)
            current = []
        else:
            current.append(i)
    return groups


def _pixels(boxes: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    cx, cy, bw, bh = boxes.unbind(-1)
    return torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1).numpy()


# --------------------------------------------------------------------------- class-level scores


def test_label_score_is_the_mean_of_its_tokens(fast_model, image):
    labels = ["cat", "Remote Control", "kookaburra"]  # kookaburra is 4 word pieces
    probs, boxes, ids = _raw(fast_model, image, "cat. remote control. kookaburra.")
    positions = _phrase_positions(ids)
    assert [len(p) for p in positions] == [1, 2, 4]
    label_scores = torch.stack([probs[:, p].mean(-1) for p in positions], -1)  # (Q, 3)
    best, best_label = label_scores.max(-1)
    order = best.argsort(descending=True)

    found = fast_model.detect(image, labels, box_threshold=0.0)
    assert len(found) == fast_model.config.num_queries
    np.testing.assert_allclose(found.scores, best[order].numpy(), atol=1e-5)
    assert found.label_ids.tolist() == best_label[order].tolist()
    assert found.labels == tuple(labels[i] for i in best_label[order])  # as given, not lower-cased
    np.testing.assert_allclose(found.boxes, _pixels(boxes[order], image.size), atol=1e-3)
    # the mean is not the best token: for some query the kookaburra pieces' max beats the mean
    piece_max = probs[:, positions[2]].max(-1).values
    assert bool((piece_max > label_scores[:, 2] + 1e-3).any())

    kept = fast_model.detect(image, labels, box_threshold=0.6)
    assert 0 < len(kept) < len(found)
    np.testing.assert_allclose(kept.scores, found.scores[found.scores > 0.6], atol=1e-6)
    assert fast_model.phrases(labels) == labels


@pytest.mark.slow  # several detect runs
def test_token_spans(fast_model, image):
    sentence = "The man in a red hat"
    spans = [[(0, 7)], [(11, 20)], [(0, 3), (17, 20)]]
    probs, _, ids = _raw(fast_model, image, sentence)
    # [CLS] the man in a red hat . [SEP]
    assert len(ids) == 9
    positions = [[1, 2], [4, 5, 6], [1, 6]]
    label_scores = torch.stack([probs[:, p].mean(-1) for p in positions], -1)
    best, best_label = label_scores.max(-1)
    order = best.argsort(descending=True)

    found = fast_model.detect(image, sentence, token_spans=spans, box_threshold=0.0)
    names = ("The man", "a red hat", "The hat")
    assert set(found.labels) <= set(names) and len(set(found.labels)) >= 2
    assert found.labels == tuple(names[i] for i in found.label_ids)
    assert found.label_ids.tolist() == best_label[order].tolist()
    np.testing.assert_allclose(found.scores, best[order].numpy(), atol=1e-5)
    # leading spaces in the prompt: spans still count characters of the prompt as given
    moved = fast_model.detect(
        image, "  " + sentence, token_spans=[[(s + 2, e + 2) for s, e in g] for g in spans], box_threshold=0.0
    )
    assert moved.labels == found.labels
    np.testing.assert_allclose(moved.scores, found.scores, atol=1e-6)


@pytest.mark.parametrize(
    ("spans", "needle"),
    [
        ([], "empty"),
        ([[]], "empty"),
        ([[(5, 30)]], "not inside"),
        ([[(3, 4)]], "covers no word"),
        ([[(4, 2)]], "not inside"),
        ([["a"]], "(start, end)"),
    ],
)
def test_bad_token_spans(fast_model, image, spans, needle):
    with pytest.raises(PromptError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fast_model.detect(image, "the man in a red hat", token_spans=spans)


def test_labels_with_separators(fast_model, image):
    """'.' and '?' would end a phrase inside the model: they are prompted as spaces, named as given."""
    labels = ["St. Bernard", "what?", "traffic_light"]
    assert [prompt_text(x) for x in labels] == ["st bernard", "what", "traffic light"]
    query = label_query(labels, fast_model.processor.tokenizer)
    assert [p.text for p in query.prompts] == ["st bernard. what. traffic light."]
    found = fast_model.detect(image, labels, box_threshold=0.0)
    assert set(found.labels) <= set(labels)
    reference = fast_model.detect(image, ["st bernard", "what", "traffic light"], box_threshold=0.0)
    np.testing.assert_allclose(found.scores, reference.scores, atol=1e-6)
    assert found.label_ids.tolist() == reference.label_ids.tolist()
    assert fast_model.phrases(labels) == labels
    with pytest.raises(PromptError, match="label 1"):
        fast_model.detect(image, ["cat", " . ? "])


def test_what_a_list_means(fast_model):
    """By type only (``gdino.processing.prompts``): never by the number of images or a "." in the strings."""
    tok = fast_model.processor.tokenizer
    # a list of strings is one label list shared by every image, "." or not
    for n in (1, 2):
        queries = queries_for_images(["a cat.", "a dog."], n, tok)
        assert len(queries) == n and all(q is queries[0] for q in queries)  # split once
        assert isinstance(queries[0], ClassQuery) and queries[0].names == ("a cat.", "a dog.")
        assert [p.text for p in queries[0].prompts] == ["a cat. a dog."]
    (alone,) = queries_for_images(["st. bernard"], 1, tok)
    assert alone.names == ("st. bernard",) and [p.text for p in alone.prompts] == ["st bernard."]
    # a list of lists: one label list per image (one list: shared)
    first, second = queries_for_images([["cat", "dog"], ["cow"]], 2, tok)
    assert first.names == ("cat", "dog") and second.names == ("cow",)
    assert [q.names for q in queries_for_images([["cat"]], 3, tok)] == [("cat",)] * 3
    # explicit keywords
    assert queries_for_images(None, 2, tok, labels=["a cat."])[1].names == ("a cat.",)
    phrases, labels = queries_for_images(None, 2, tok, prompts=["a cat. a dog", ["cat", "dog"]])
    assert phrases == "a cat. a dog." and labels.names == ("cat", "dog")
    with pytest.raises(PromptError, match="mixes strings and lists"):
        queries_for_images(["a cat. a dog", ["cat", "dog"]], 2, tok)
    with pytest.raises(PromptError, match="3 label lists for 2 images"):
        queries_for_images([["a"], ["b"], ["c"]], 2, tok)
    with pytest.raises(PromptError, match="3 entries for 2 images"):
        queries_for_images(None, 2, tok, prompts=["a.", "b.", ["c"]])
    with pytest.raises(PromptError, match="empty"):
        queries_for_images([], 1, tok)


def test_label_alone_too_long(fast_model, image):
    with pytest.raises(PromptError, match=r"label 1 .*256"):
        fast_model.detect(image, ["cat", " ".join(["dog"] * 254)])  # 254 + "." + [CLS] + [SEP] = 257
    long = " ".join(["dog"] * 253)  # exactly 256 with its "." and [CLS], [SEP]: a chunk of its own
    query = label_query(["cat", long, "cow"], fast_model.processor.tokenizer)
    assert [p.ids for p in query.prompts] == [(0,), (1,), (2,)]
    assert fast_model.phrases(["cat", long, "cow"]) == ["cat", long, "cow"]


# --------------------------------------------------------------------------- chunks


def lvis_like_names(n: int = 1203) -> list[str]:
    """n distinct multi-word names in LVIS' style (underscores, parentheses, word pieces)."""
    special = [
        "aerosol_can",
        "air_conditioner",
        "bow_(weapon)",
        "hot-air_balloon",
        "teddy_bear",
        "hair_dryer",
        "kitchen_sink",
        "pan_(for_cooking)",
        "beer_bottle",
        "rubber_band",
        "St. Bernard",
        "kookaburra",
    ]
    adjectives = [
        "red",
        "wooden",
        "plastic",
        "folding",
        "electric",
        "striped",
        "antique",
        "glass",
        "leather",
        "metal",
        "paper",
        "rubber",
        "ceramic",
        "woolen",
        "inflatable",
        "portable",
        "vintage",
        "toy",
        "broken",
        "silver",
        "golden",
        "frozen",
        "wet",
        "tiny",
        "giant",
        "baby",
        "kitchen",
        "garden",
        "camping",
        "office",
    ]
    nouns = [
        "chair",
        "table",
        "lamp",
        "bottle",
        "umbrella",
        "bicycle helmet",
        "teapot",
        "suitcase",
        "kite",
        "hairbrush",
        "saucepan",
        "skateboard",
        "mailbox",
        "wristwatch",
        "paintbrush",
        "thermos",
        "toaster oven",
        "wine glass",
        "fire extinguisher",
        "traffic cone",
        "sleeping bag",
        "cutting board",
        "flip-flop (sandal)",
        "pressure cooker",
        "measuring cup",
        "ice skate",
        "bath towel",
        "shower curtain",
        "bird feeder",
        "car battery",
        "dog collar",
        "gas mask",
        "jigsaw puzzle",
        "ladle",
        "music stand",
        "nutcracker",
        "pencil sharpener",
        "pool table",
        "rolling pin",
        "salad spinner",
        "tennis racket",
        "watering can",
        "yoga mat",
        "zucchini",
    ]
    combos = [
        f"{a}_{b.replace(' ', '_')}" if i % 3 == 0 else f"{a} {b}"
        for i, (a, b) in enumerate(itertools.product(adjectives, nouns))
    ]
    names = special + combos
    assert len(names) >= n and len(set(names)) == len(names)
    return names[:n]


def test_lvis_sized_list_is_chunked_without_cutting_a_label(fast_model):
    names = lvis_like_names()
    tok = fast_model.processor.tokenizer
    query = label_query(names, tok)
    assert len(query.prompts) > 10
    assert [i for p in query.prompts for i in p.ids] == list(range(len(names)))
    for prompt in query.prompts:
        ids = tok.encode([prompt.text]).input_ids[0].tolist()
        assert len(ids) <= 256
        assert ids[0] == 101 and ids[-1] == 102 and ids[-2] == DOT
        for label, positions in zip(prompt.ids, prompt.tokens):
            alone = tok.encode([prompt_text(names[label])]).input_ids[0].tolist()[1:-1]
            assert [ids[p] for p in positions] == alone  # every token of the label, nothing else
            assert ids[positions[-1] + 1] == DOT and ids[positions[0] - 1] in (101, DOT)
    # greedy packing: the next chunk's first label would not have fitted
    for prompt, following in zip(query.prompts, query.prompts[1:]):
        first = len(tok.encode([prompt_text(names[following.ids[0]])]).input_ids[0]) - 2
        assert len(tok.encode([prompt.text]).input_ids[0]) + first + 1 > 256


@pytest.mark.slow  # 1,203 labels: five encoder and decoder passes
def test_lvis_sized_list_end_to_end(fast_model, image):
    """1,203 labels: the image side runs once, every chunk's queries come back with ids of the full
    list, and each chunk's detections equal detecting that chunk's labels alone."""
    names = lvis_like_names()
    query = label_query(names, fast_model.processor.tokenizer)
    calls = []
    original = fast_model.image_features
    fast_model.image_features = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        found = fast_model.detect(image, names, box_threshold=0.0)
    finally:
        del fast_model.image_features
    assert calls == [1]
    assert len(found) == fast_model.config.num_queries * len(query.prompts)
    assert found.labels == tuple(names[i] for i in found.label_ids)
    assert np.all(np.diff(found.scores) <= 0)
    assert len(set(found.label_ids.tolist())) > len(query.prompts)
    encoded = fast_model.encode_image(image)
    for chunk in (query.prompts[0], query.prompts[-1]):
        alone = fast_model.detect(encoded, [names[i] for i in chunk.ids], box_threshold=0.0)
        mine = np.isin(found.label_ids, chunk.ids)
        assert mine.sum() == len(alone) == fast_model.config.num_queries
        np.testing.assert_allclose(found.scores[mine], alone.scores, atol=1e-6)
        np.testing.assert_allclose(found.boxes[mine], alone.boxes, atol=1e-4)
        assert found.label_ids[mine].tolist() == [chunk.ids[i] for i in alone.label_ids]


# --------------------------------------------------------------------------- NMS


def test_box_iou_values():
    a = np.array([[0.0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 0, 0]])
    expected = np.array([[50 / 150, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-6)


def test_nms_greedy_order():
    boxes = np.array([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [5, 0, 15, 10]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    # IoU(D, A) = 1/3, IoU(D, B) = 60/140, IoU(A, B) = 90/110
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.4).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.3).tolist() == [3, 2]
    assert nms(boxes, scores, 0.9).tolist() == [3, 0, 1, 2]
    # a box dropped by a better one does not drop others: Z goes (0.54 with X), Y stays (0.25 with X)
    chain = np.array([[0.0, 0, 10, 10], [6, 0, 16, 10], [3, 0, 13, 10]])
    assert nms(chain, np.array([0.9, 0.8, 0.85]), 0.5).tolist() == [0, 1]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_class_nms_keeps_other_classes():
    boxes = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [1, 0, 11, 10]])
    scores = np.array([0.5, 0.9, 0.7, 0.6])
    ids = np.array([0, 1, 0, 1])
    assert class_nms(boxes, scores, ids, 0.5).tolist() == [1, 2]
    assert class_nms(boxes, scores, np.array([0, 1, 2, 3]), 0.5).tolist() == [1, 2, 3, 0]


def test_detect_with_nms(fast_model, image):
    labels = ["cat", "remote control", "sofa"]
    everything = fast_model.detect(image, labels, box_threshold=0.3)
    thinned = fast_model.detect(image, labels, box_threshold=0.3, nms_threshold=0.1)  # random boxes overlap little
    # plain-Python greedy NMS per label over the detections sorted best first
    keep = []
    for i in range(len(everything)):
        same = [j for j in keep if everything.label_ids[j] == everything.label_ids[i]]
        if all(_iou(everything.boxes[i], everything.boxes[j]) <= 0.1 for j in same):
            keep.append(i)
    assert 0 < len(keep) < len(everything)
    assert thinned.labels == tuple(everything.labels[i] for i in keep)
    np.testing.assert_allclose(thinned.scores, everything.scores[keep])
    np.testing.assert_allclose(thinned.boxes, everything.boxes[keep])
    phrases = fast_model.detect(image, "a cat. a sofa.", box_threshold=0.3)
    thinned = fast_model.detect(image, "a cat. a sofa.", box_threshold=0.3, nms_threshold=0.1)
    assert 0 < len(thinned) < len(phrases)
    assert set(map(tuple, thinned.boxes.tolist())) <= set(map(tuple, phrases.boxes.tolist()))
    for i, j in itertools.combinations(range(len(thinned)), 2):
        if thinned.label_ids[i] == thinned.label_ids[j]:
            assert _iou(thinned.boxes[i], thinned.boxes[j]) <= 0.1 + 1e-6


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
