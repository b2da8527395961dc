"""The one ``detect`` loop, over a small backend interface that the PyTorch detector and the
torch-free ONNX runtime both implement.

A backend turns one image's encoded features and one normalised prompt into that pass's raw
outputs (``Backend.run_text``); everything else is here, once: what the text means
(``resolve_queries``, by ``gdino.processing.classes``), which passes each image needs (one per
phrase prompt, one per label chunk), and the decode (``gdino.inference.postprocess``). Nothing
here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gdino.inference.detections import Detections
from gdino.inference.postprocess import (
    ChunkScores,
    best_per_query,
    chunk_scores,
    class_detections,
    nms_detections,
    phrase_detections,
)
from gdino.processing.classes import ClassPrompt, ClassQuery, TokenSpans, queries_for_images
from gdino.processing.prompts import TextInput
from gdino.processing.text import TextTokenizer, phrase_names
from gdino.utils.checks import check_fraction

ChunkCallback = Callable[[int, int], None]


class Backend(Protocol):
    """What a runtime gives the loop: one pass of the text-dependent model on one image."""

    def run_text(self, image: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
        """One image's encoded features (the backend's own type) and a normalised prompt ->
        (Q, T) float32 token logits (-inf past the prompt) and (Q, 4) float32 relative boxes."""
        ...


@dataclass(frozen=True)
class PhraseQuery:
    """A phrase prompt, normalised, with its phrases' token spans and texts."""

    text: str
    spans: list[tuple[int, int]]
    names: list[str]


Query = ClassQuery | PhraseQuery


@dataclass(frozen=True)
class Thresholds:
    """``detect``'s thresholds, each checked to be a finite number in [0, 1] (``gdino.utils.checks``)."""

    box: float = 0.35
    text: float = 0.25
    nms: float | None = None

    def __post_init__(self) -> None:
        check_fraction(self.box, "box_threshold")
        check_fraction(self.text, "text_threshold")
        if self.nms is not None:
            check_fraction(self.nms, "nms_threshold")

    @classmethod
    def chosen(
        cls, box: float | None, text: float | None, nms: float | None, defaults: Mapping[str, float]
    ) -> Thresholds:
        """The thresholds a caller gave, the model's ``defaults`` (``box_threshold``, ``text_threshold``:
        what its config recommends) for those it left out."""
        return cls(
            defaults.get("box_threshold", cls.box) if box is None else box,
            defaults.get("text_threshold", cls.text) if text is None else text,
            nms,
        )


def resolve_queries(
    prompt: TextInput | None,
    n_images: int,
    tokenizer: TextTokenizer,
    special_token_ids: Sequence[int],
    token_spans: TokenSpans | None = None,
    labels: Sequence[str] | None = None,
    prompts: Sequence[str | Sequence[str]] | None = None,
) -> list[Query]:
    """Per image a ``ClassQuery`` (label list, token spans) or a ``PhraseQuery`` (a phrase prompt).

    Raises:
        PromptError: as ``gdino.processing.classes.queries_for_images``.
    """
    queries = queries_for_images(prompt, n_images, tokenizer, token_spans, labels=labels, prompts=prompts)
    return [
        q if isinstance(q, ClassQuery) else PhraseQuery(q, *phrase_names(q, tokenizer, tuple(special_token_ids)))
        for q in queries
    ]


def label_chunks(
    backend: Backend, image: Any, prompts: Sequence[ClassPrompt], callback: ChunkCallback | None = None
) -> list[ChunkScores]:
    """Class scores of every query for each label chunk, one pass each.

    ``callback(done, total)`` is called before each pass and once after the last; an exception it
    raises ends the loop before the next pass.
    """
    out = []
    for done, prompt in enumerate(prompts):
        if callback is not None:
            callback(done, len(prompts))
        out.append(chunk_scores(*backend.run_text(image, prompt.text), prompt))
    if callback is not None:
        callback(len(prompts), len(prompts))
    return out


def detect_queries(
    backend: Backend,
    images: Iterable[Any],
    queries: Sequence[Query],
    sizes: Sequence[tuple[int, int]],
    thresholds: Thresholds,
    callback: ChunkCallback | None = None,
) -> list[Detections]:
    """Each image's ``Detections`` for its query, one image at a time.

    One image at a time: the query selection orders near-tied proposals by score, and 1e-7
    differences between batched and single matrix products can swap two of them, so only the
    single-image computation guarantees batch-independent detections.
    """
    results = []
    for image, query, size in zip(images, queries, sizes):
        if isinstance(query, ClassQuery):
            candidates = best_per_query(label_chunks(backend, image, query.prompts, callback))
            results.append(class_detections(candidates, query.names, size, thresholds.box, thresholds.nms))
            continue
        logits, boxes = backend.run_text(image, query.text)
        found = phrase_detections(logits, boxes, query.spans, query.names, size, thresholds.box, thresholds.text)
        results.append(found if thresholds.nms is None else nms_detections(found, thresholds.nms))
    return results


def query_names(query: Query) -> list[str]:
    """The labels a query's detections carry: the phrases of a prompt, or the label list."""
    return list(query.names)
