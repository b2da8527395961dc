"""Class-level prompts: a list of labels (or character spans of a sentence) scored label by label.

A label list ``["cat", "remote control"]`` becomes the prompt ``"cat. remote control."``. Each
label owns the tokens of its words; its score for a box is the mean of those tokens'
probabilities (``sigmoid(logits)`` times a positive map whose rows sum to 1, as the original
repository's COCO evaluation scores classes). The box's class is the label scoring highest.

A list longer than the model's 256 tokens is split into chunks (``ClassPrompt``) that never cut
a label; each chunk is one pass of the detector over the same image features.

Labels keep their text as given (``Detections.labels[i] == labels[label_ids[i]]``). In the prompt
they are written by ``gdino.processing.prompts.prompt_text``: lower-cased, and ``"."``, ``"?"`` (which end a
phrase inside the model) and ``"_"`` become spaces: ``"st. bernard"`` is prompted as
``"st bernard"``, ``"traffic_light"`` as ``"traffic light"``. Which inputs are label lists is
``gdino.processing.prompts``' rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gdino.processing.prompts import label_texts, normalize_prompt, prompt_text, read_prompts
from gdino.processing.text import PromptError, TextTokenizer

__all__ = ["ClassPrompt", "ClassQuery", "TokenSpans", "label_query", "prompt_text", "queries_for_images", "span_query"]

if TYPE_CHECKING:  # the ONNX runtime uses this module without torch
    pass

TokenSpans = Sequence[Sequence[tuple[int, int]]]


@dataclass(frozen=True)
class ClassPrompt:
    """One prompt of whole labels: what one pass of the detector scores.

    Attributes:
        text: the prompt as tokenised, e.g. "cat. remote control.".
        ids: index of each of its labels in the full label list.
        tokens: per label, the positions of its tokens in ``text``'s tokenisation ([CLS] is 0).
    """

    text: str
    ids: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]

    def positive_weights(self, length: int) -> np.ndarray:
        """(C, length) float32: 1 / n on each of a label's n tokens, so ``probs @ weights.T`` is the mean."""
        out = np.zeros((len(self.tokens), length), dtype=np.float32)
        for row, positions in enumerate(self.tokens):
            out[row, list(positions)] = 1.0 / len(positions)
        return out


@dataclass(frozen=True)
class ClassQuery:
    """A label list (or a sentence's spans), split into prompts of at most ``max_text_len`` tokens.

    Attributes:
        names: the labels as given; ``label_ids`` of detections index this.
        prompts: the chunks, in order; together they hold every label once.
    """

    names: tuple[str, ...]
    prompts: tuple[ClassPrompt, ...]


def label_query(labels: Sequence[str], tokenizer: TextTokenizer) -> ClassQuery:
    """Splits a label list into prompts that fit the model, never cutting a label.

    Labels are packed in order, greedily: a chunk holds ``[CLS] l1 . l2 . ... [SEP]`` up to
    ``tokenizer.max_text_len`` tokens. Duplicates are not checked here (``detect`` refuses them
    through ``gdino.processing.prompts.check_labels``; an evaluation takes a data set's names as they are).

    Raises:
        PromptError: an empty list, a label that is not a string, has no words, or alone is
            longer than the model accepts.
    """
    texts = label_texts(labels)
    sizes = [len(tokenizer.offsets(t)) - 2 for t in texts]  # without [CLS] and [SEP]
    budget = tokenizer.max_text_len - 2
    chunks: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if size + 1 > budget:
            raise PromptError(
                f"label {i} ({labels[i][:60]!r}) has {size} tokens; with its '.', [CLS] and "
                f"[SEP] that is over the {tokenizer.max_text_len} tokens the model accepts"
            )
        if used + size + 1 > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += size + 1
    prompts = tuple(_chunk_prompt([texts[i] for i in chunk], tuple(chunk), tokenizer) for chunk in chunks)
    return ClassQuery(tuple(labels), prompts)


def _chunk_prompt(texts: list[str], ids: tuple[int, ...], tokenizer: TextTokenizer) -> ClassPrompt:
    """The prompt "l1. l2. ... ln." and each label's token positions in it."""
    spans, start = [], 0
    for text in texts:
        spans.append((start, start + len(text)))
        start += len(text) + 2  # ". "
    prompt = ". ".join(texts) + "."
    offsets = tokenizer.offsets(prompt)
    tokens = tuple(_covered(offsets, [span]) for span in spans)
    return ClassPrompt(prompt, ids, tokens)


def span_query(prompt: str, token_spans: TokenSpans, tokenizer: TextTokenizer) -> ClassQuery:
    """Labels given as character spans of a sentence (the original repository's ``token_spans``).

    ``span_query("the man in a red hat", [[(0, 7)], [(11, 20)]])`` has the labels "the man" and
    "a red hat". A label may be several spans (``[(0, 3), (8, 11)]``: "the hat"); its name is
    the spans' texts joined by a space, and its tokens are those overlapping any of its spans.

    Raises:
        PromptError: no spans, a span outside the prompt or empty, a label covering no token, or
            a prompt over the token limit.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"token_spans need one string prompt, got {type(prompt).__name__}")
    text = normalize_prompt(prompt)  # lower-case, stripped, final "."
    if len(prompt.lower()) != len(prompt):
        raise PromptError("token_spans: the prompt changes length when lower-cased; give it in lower case")
    lead = len(prompt) - len(prompt.lstrip())
    tokenizer.encode([text])  # PromptError when over the limit
    offsets = [(a + lead, b + lead) if b > a else (0, 0) for a, b in tokenizer.offsets(text)]
    if not token_spans:
        raise PromptError("token_spans is empty; give e.g. [[(0, 7)]] for the first 7 characters")
    names, tokens = [], []
    for i, spans in enumerate(token_spans):
        spans = [_span(s, len(prompt), i) for s in spans]
        if not spans:
            raise PromptError(f"token_spans[{i}] is empty; give at least one (start, end)")
        covered = _covered(offsets, spans)
        if not covered:
            raise PromptError(f"token_spans[{i}] {spans} covers no word of {prompt!r}")
        names.append(" ".join(prompt[s:e] for s, e in spans))
        tokens.append(covered)
    return ClassQuery(tuple(names), (ClassPrompt(text, tuple(range(len(names))), tuple(tokens)),))


def _span(span: Any, length: int, label: int) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in span)
    except (TypeError, ValueError):
        raise PromptError(f"token_spans[{label}]: each span must be (start, end), got {span!r}") from None
    if not 0 <= start < end <= length:
        raise PromptError(
            f"token_spans[{label}]: span ({start}, {end}) is not inside the prompt (0 <= start < end <= {length})"
        )
    return start, end


def _covered(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Positions of the tokens whose characters overlap any span ([CLS]/[SEP] have none)."""
    return tuple(i for i, (a, b) in enumerate(offsets) if b > a and any(a < end and b > start for start, end in spans))


# --------------------------------------------------------------------------- what a prompt is


def queries_for_images(
    prompt: object,
    n_images: int,
    tokenizer: TextTokenizer,
    token_spans: TokenSpans | None = None,
    *,
    labels: object = None,
    prompts: object = None,
) -> list[str | ClassQuery]:
    """One query per image, read by ``gdino.processing.prompts.read_prompts``: a phrase prompt or a ``ClassQuery``.

    A phrase prompt is a normalised string (scored phrase by phrase); a label list, or a string
    with ``token_spans``, is a ``ClassQuery``. A label list shared by all images is split once.

    Raises:
        PromptError: bad prompts, or a number of prompts that does not match the images.
    """
    if token_spans is not None:
        if labels is not None or prompts is not None:
            raise PromptError("token_spans pick labels out of one string prompt; give no labels= or prompts=")
        return [span_query(prompt, token_spans, tokenizer)] * n_images  # type: ignore[arg-type]
    split: dict[int, ClassQuery] = {}  # id of a label tuple -> its query: a shared list is split once
    queries: list[str | ClassQuery] = []
    for item in read_prompts(prompt, n_images, labels=labels, prompts=prompts):
        if isinstance(item, str):
            queries.append(item)
        else:
            if id(item) not in split:
                split[id(item)] = label_query(item, tokenizer)
            queries.append(split[id(item)])
    return queries
