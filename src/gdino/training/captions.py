"""Training captions: which phrases an image is prompted with, and which tokens each box's phrase owns.

Detection data (a label list): as the original training builds them (Open-GroundingDino's
``ODVGDataset``), the image's positive labels and negatives sampled from the rest of the list,
shuffled together, joined as the project's prompts are (``"red circle. blue square."``, labels
written by :func:`gdino.processing.classes.prompt_text`). Unlike the original, which joins ``max_labels``
labels and lets the tokenizer truncate at 256 tokens (cutting a label, and sometimes a
positive), labels are added whole while they fit: positives first (a positive that cannot fit
is left out with its boxes), then negatives until ``max_labels`` or the token limit.

Grounding data keeps its caption; each phrase owns the tokens overlapping its character spans.
A caption over the limit is cut at a token boundary, and phrases past the cut leave with their boxes.

``Caption.tokens`` gives the positive map a loss needs: row ``p`` marks phrase ``p``'s tokens
(``[CLS]`` is position 0), and a box's class label is its phrase's index. For a label-list caption
these rows are exactly the phrases transformers' ``build_label_maps`` finds between the "." tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gdino.processing.classes import prompt_text
from gdino.processing.text import PromptError, TextTokenizer
from gdino.training.samples import Sample


@dataclass(frozen=True)
class Caption:
    """A training prompt and where its phrases are.

    Attributes:
        text: the prompt, tokenised as it is (``[CLS] text [SEP]``).
        phrases: each phrase's text.
        tokens: each phrase's token positions in ``text``'s tokenisation.
        box_labels: per kept box, the index of its phrase (the ``class_labels`` of the loss).
        kept: which of the sample's boxes are kept (all, unless some phrase did not fit).
        label_ids: detection captions: each phrase's index in the data set's label list.
    """

    text: str
    phrases: tuple[str, ...]
    tokens: tuple[tuple[int, ...], ...]
    box_labels: tuple[int, ...]
    kept: tuple[int, ...]
    label_ids: tuple[int, ...] = ()

    def positive_map(self, length: int = 256) -> np.ndarray:
        """(P, length) float32: 1 on each phrase's tokens, 0 elsewhere."""
        out = np.zeros((len(self.tokens), length), dtype=np.float32)
        for row, positions in enumerate(self.tokens):
            out[row, list(positions)] = 1.0
        return out


class CaptionBuilder:
    """Builds captions for a data set's samples.

    Args:
        tokenizer: the model's tokenizer (its ``max_text_len`` is the token limit).
        names: the data set's label list (detection data); may be empty for grounding data.
        max_labels: the most labels (positives and negatives) in a detection caption (80 in
            Open-GroundingDino).

    Raises:
        PromptError: a label that has no words or alone does not fit the token limit.
    """

    def __init__(self, tokenizer: TextTokenizer, names: Sequence[str] = (), max_labels: int = 80) -> None:
        if max_labels < 1:
            raise ValueError(f"max_labels must be at least 1, got {max_labels}")
        self.tokenizer = tokenizer
        self.max_labels = max_labels
        self.texts = tuple(prompt_text(n) for n in names)
        self.sizes = tuple(len(tokenizer.offsets(t)) - 2 for t in self.texts)  # without [CLS] and [SEP]
        self.budget = tokenizer.max_text_len - 2
        for i, (text, size) in enumerate(zip(self.texts, self.sizes)):
            if not text or size + 1 > self.budget:
                raise PromptError(
                    f"label {i} ({names[i][:60]!r}) is empty or alone longer than the "
                    f"{tokenizer.max_text_len} tokens a prompt may have"
                )

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Caption:
        """The sample's caption: its own for grounding data, else built from the label list."""
        if sample.is_grounding:
            return self.grounding(sample)
        return self.detection(sample.labels, rng)

    def detection(self, box_labels: Sequence[int], rng: np.random.Generator) -> Caption:
        """A caption of the boxes' labels and sampled negatives, shuffled; see the module docstring."""
        positives = sorted({int(label) for label in box_labels})
        chosen: list[int] = []
        used = 0
        for label in (positives[i] for i in rng.permutation(len(positives))):
            if used + self.sizes[label] + 1 <= self.budget and len(chosen) < self.max_labels:
                chosen.append(label)
                used += self.sizes[label] + 1
        is_positive = np.zeros(len(self.texts), dtype=bool)
        is_positive[positives] = True
        negatives = np.flatnonzero(~is_positive)
        for label in negatives[rng.permutation(len(negatives))].tolist():
            if len(chosen) >= self.max_labels or used + self.sizes[label] + 1 > self.budget:
                break
            chosen.append(label)
            used += self.sizes[label] + 1
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        return self._label_caption(chosen, box_labels)

    def _label_caption(self, chosen: list[int], box_labels: Sequence[int]) -> Caption:
        """ "l1. l2. ... ln." with each label's tokens, and the boxes whose label is in it."""
        spans, start = [], 0
        for label in chosen:
            spans.append(((start, start + len(self.texts[label])),))
            start += len(self.texts[label]) + 2  # ". "
        text = ". ".join(self.texts[label] for label in chosen) + "."
        tokens = _phrase_tokens(self.tokenizer.offsets(text), spans)
        phrase_of = {label: p for p, label in enumerate(chosen)}
        kept = tuple(i for i, label in enumerate(box_labels) if int(label) in phrase_of)
        return Caption(
            text,
            tuple(self.texts[label] for label in chosen),
            tokens,
            tuple(phrase_of[int(box_labels[i])] for i in kept),
            kept,
            tuple(chosen),
        )

    def grounding(self, sample: Sample) -> Caption:
        """The sample's caption (a final "." added) and its phrases' tokens; cut at the token limit."""
        text = sample.caption.rstrip() if sample.caption else ""
        text = text if text.endswith(".") else text + "."
        offsets = self.tokenizer.offsets(text)
        if len(offsets) > self.tokenizer.max_text_len:
            end = offsets[self.budget][1]  # the last token that fits ([CLS] is offsets[0])
            text = text[:end].rstrip()
            offsets = self.tokenizer.offsets(text)
        tokens = _phrase_tokens(offsets, [p.spans for p in sample.phrases])
        fits = [bool(t) and all(e <= len(text) for _, e in p.spans) for p, t in zip(sample.phrases, tokens)]
        new_index = {p: i for i, p in enumerate(p for p in range(len(fits)) if fits[p])}
        kept = tuple(i for i, label in enumerate(sample.labels) if fits[label])
        return Caption(
            text,
            tuple(p.text for p, f in zip(sample.phrases, fits) if f),
            tuple(t for t, f in zip(tokens, fits) if f),
            tuple(new_index[sample.labels[i]] for i in kept),
            kept,
        )


def _phrase_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[tuple[int, int]]]
) -> tuple[tuple[int, ...], ...]:
    """Per phrase, the positions of the tokens whose characters overlap any of its spans."""
    return tuple(
        tuple(i for i, (a, b) in enumerate(offsets) if b > a and any(a < end and b > start for start, end in phrase))
        for phrase in spans
    )
