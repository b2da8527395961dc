"""One detect loop and one decode for both runtimes: the PyTorch detector and the torch-free ONNX
runtime give identical ``Detections`` when their passes return the same raw outputs.

Each runtime's ``run_text`` (the backend's one pass) is replaced by the same made-up outputs, a
function of the prompt text alone, so whatever differs afterwards would be a second copy of the
rules: query resolution, label chunks, thresholds, phrase and label scoring, NMS, pixels.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from gdino.inference.detections import Detections
from gdino.inference.pipeline import Thresholds
from gdino.runtime.onnx import EncodedImages, OnnxDetector

QUERIES = 40
SIZE = (320, 200)  # (width, height)


def raw_outputs(_image: object, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(Q, 256) logits, -inf past the prompt's tokens, and (Q, 4) boxes, seeded by the text."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    logits = rng.normal(-1.0, 2.0, (QUERIES, 256)).astype(np.float32)
    logits[:, min(256, 2 + len(text.split())) :] = -np.inf
    centres = rng.uniform(0.2, 0.8, (QUERIES, 2))
    sizes = rng.uniform(0.05, 0.4, (QUERIES, 2))
    boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
    boxes[1] = boxes[0] + [0.01, 0, 0, 0]  # one near-duplicate pair, for NMS
    return logits, boxes


@pytest.fixture(scope="module")
def runtimes(fast_model):
    """The PyTorch detector and an ONNX runtime with the detector's tokenizer, both on ``raw_outputs``."""
    onnx = object.__new__(OnnxDetector)
    onnx.tokenizer = fast_model.processor.tokenizer
    onnx.special_token_ids = tuple(fast_model.config.special_token_ids)
    onnx.settings = fast_model.config.detection_defaults()  # what an export of the model records
    onnx.processor = SimpleNamespace(tokenizer=onnx.tokenizer)
    onnx.run_text = raw_outputs  # type: ignore[method-assign]
    torch_side = fast_model
    original = torch_side.run_text
    torch_side.run_text = raw_outputs  # type: ignore[method-assign]
    yield torch_side, onnx
    torch_side.run_text = original  # type: ignore[method-assign]


def _encoded_torch(model, n: int):
    from gdino.inference.detector import EncodedImages as TorchEncoded

    features = model.encode_image([np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8)] * n).features
    return TorchEncoded(features, [SIZE] * n, single=n == 1)


def _same(a: Detections, b: Detections) -> None:
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    assert a.labels == b.labels and a.image_size == b.image_size
    assert a.boxes.dtype == b.boxes.dtype == np.float32 and a.label_ids.dtype == b.label_ids.dtype == np.int64


LONG = [f"object kind {i}" for i in range(100)]  # over 256 tokens: several label chunks


@pytest.mark.parametrize(
    ("prompt", "kwargs"),
    [
        ("a cat. a remote control.", {}),
        ("a cat. a remote control.", {"nms_threshold": 0.5, "box_threshold": 0.2, "text_threshold": 0.3}),
        (["cat", "remote control", "st. bernard"], {"box_threshold": 0.3}),
        (["cat", "remote control", "st. bernard"], {"box_threshold": 0.3, "nms_threshold": 0.4}),
        (LONG, {"box_threshold": 0.25, "nms_threshold": 0.5}),
    ],
)
def test_both_runtimes_decode_the_same_raw_outputs_alike(runtimes, prompt, kwargs) -> None:
    torch_side, onnx = runtimes
    ours = torch_side.detect(_encoded_torch(torch_side, 1), prompt, **kwargs)
    theirs = onnx.detect(EncodedImages([[]], [SIZE], single=True), prompt, **kwargs)
    assert len(ours) > 0  # the made-up outputs give detections to compare
    _same(ours, theirs)


def test_token_spans_and_prompts_per_image_decode_alike(runtimes) -> None:
    torch_side, onnx = runtimes
    spans = [[(0, 7)], [(11, 20)]]
    a = torch_side.detect(_encoded_torch(torch_side, 1), "the man in a red hat", token_spans=spans, box_threshold=0.2)
    b = onnx.detect(
        EncodedImages([[]], [SIZE], single=True), "the man in a red hat", token_spans=spans, box_threshold=0.2
    )
    _same(a, b)
    prompts = ["a dog.", ["cat", "sofa"]]
    many_a = torch_side.detect(_encoded_torch(torch_side, 2), prompts=prompts, box_threshold=0.2)
    many_b = onnx.detect(EncodedImages([[], []], [SIZE, SIZE]), prompts=prompts, box_threshold=0.2)
    for x, y in zip(many_a, many_b):
        _same(x, y)
    assert torch_side.phrases("a cat. a dog.") == onnx.phrases("a cat. a dog.") == ["a cat", "a dog"]


def test_thresholds_are_checked_before_any_pass() -> None:
    with pytest.raises(ValueError, match="box_threshold"):
        Thresholds(box=1.5)
    with pytest.raises(ValueError, match="nms_threshold"):
        Thresholds(nms=float("nan"))
