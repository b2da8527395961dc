"""Class-level prompts: a list of labels (or character spans of a sentence) scored label by label.

A label list ``["cat", "remote control"]`` becomes the prompt ``"cat. remote control."``. Each
label owns the tokens of its words; its score for a box is the mean of those tokens'
probabilities (``sigmoid(logits)`` times a positive map whose rows sum to 1, as the original
repository's COCO evaluation scores classes). The box's class is the label scoring highest.

A list longer than the model's 256 tokens is split into chunks (``ClassPrompt``) that never cut
a label; each chunk is one pass of the detector over the same image features.

Labels keep their text as given (``Detections.labels[i] == labels[label_ids[i]]``). In the prompt
they are lower-cased, and ``"."``, ``"?"`` (which end a phrase inside the model) and ``"_"``
become spaces: ``"st. bernard"`` is prompted as ``"st bernard"``, ``"traffic_light"`` as
``"traffic light"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .text import PromptError, TextTokenizer, normalize_prompt

if TYPE_CHECKING:  # the ONNX runtime uses this module without torch
    import torch

TokenSpans = Sequence[Sequence[tuple[int, int]]]

_PROMPT_BREAKERS = re.compile(r"[.?_]")


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

    def positive_map(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(C, length) float32: 1 / n on each of a label's n tokens, so ``probs @ map.T`` is the mean."""
        import torch

        return torch.from_numpy(self.positive_weights(length)).to(device)

    def positive_weights(self, length: int) -> np.ndarray:
        """``positive_map`` as a numpy array."""
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


def prompt_text(label: str) -> str:
    """How a label is written in the prompt: ``"St. Bernard_dog"`` -> ``"st bernard dog"``."""
    return " ".join(_PROMPT_BREAKERS.sub(" ", label.lower()).split())


def label_query(labels: Sequence[str], tokenizer: TextTokenizer) -> ClassQuery:
    """Splits a label list into prompts that fit the model, never cutting a label.

    Labels are packed in order, greedily: a chunk holds ``[CLS] l1 . l2 . ... [SEP]`` up to
    ``tokenizer.max_text_len`` tokens.

    Raises:
        PromptError: an empty list, a label that is not a string, has no words, or alone is
            longer than the model accepts.
    """
    if isinstance(labels, str) or len(labels) == 0:
        raise PromptError("the list of labels is empty; give at least one label, e.g. ['cat']")
    texts = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise PromptError(f"label {i} must be a string, got {type(label).__name__}")
        text = prompt_text(label)
        if not text:
            raise PromptError(f"label {i} ({label!r}) is empty or has only separators such as '.'")
        texts.append(text)
    sizes = [len(tokenizer.offsets(t)) - 2 for t in texts]  # without [CLS] and [SEP]
    budget = tokenizer.max_text_len - 2
    chunks: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if size + 1 > budget:
            raise PromptError(f"label {i} ({labels[i][:60]!r}) has {size} tokens; with its '.', [CLS] and "
                              f"[SEP] that is over the {tokenizer.max_text_len} tokens the model accepts")
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


def _span(span: object, length: int, label: int) -> tuple[int, int]:
    try:
        start, end = (int(v) for v in span)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise PromptError(f"token_spans[{label}]: each span must be (start, end), got {span!r}") from None
    if not 0 <= start < end <= length:
        raise PromptError(f"token_spans[{label}]: span ({start}, {end}) is not inside the prompt "
                          f"(0 <= start < end <= {length})")
    return start, end


def _covered(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Positions of the tokens whose characters overlap any span ([CLS]/[SEP] have none)."""
    return tuple(
        i for i, (a, b) in enumerate(offsets) if b > a and any(a < end and b > start for start, end in spans)
    )


# --------------------------------------------------------------------------- what a prompt is


def queries_for_images(
    prompt: object, n_images: int, tokenizer: TextTokenizer, token_spans: TokenSpans | None = None
) -> list[str | ClassQuery]:
    """One query per image: a phrase prompt (a string, scored as today) or a ``ClassQuery``.

    * ``"a cat. a remote control."`` -> a phrase prompt; with ``token_spans``, a ``ClassQuery``;
    * ``["cat", "remote control"]`` -> a label list, any length;
    * a list of strings some of which hold ``"."`` is one phrase prompt per image when there are
      one or as many as images (the Hugging Face rule), else a label list (``["st. bernard", "cat"]``);
    * a list of prompts and label lists -> one per image.

    Raises:
        PromptError: bad prompts, or a number of prompts that does not match the images.
    """
    if token_spans is not None:
        return [span_query(prompt, token_spans, tokenizer)] * n_images  # type: ignore[arg-type]
    if isinstance(prompt, str):
        return [normalize_prompt(prompt)] * n_images
    if not isinstance(prompt, (list, tuple)):
        raise PromptError(f"the prompt must be a string or a list, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise PromptError("the list of labels is empty; give at least one label, e.g. ['cat']")
    if all(isinstance(p, str) for p in prompt):
        per_image = any("." in p for p in prompt) and len(prompt) in (1, n_images)
        if not per_image:
            return [label_query(prompt, tokenizer)] * n_images
    if len(prompt) not in (1, n_images):
        raise PromptError(f"got {len(prompt)} prompts for {n_images} images; give one prompt, or one per image")
    queries = []
    for item in prompt:
        if isinstance(item, str):
            queries.append(normalize_prompt(item))
        elif isinstance(item, (list, tuple)):
            queries.append(label_query(item, tokenizer))
        else:
            raise PromptError(f"each prompt must be a string or a list of labels, got {type(item).__name__}")
    return queries * n_images if len(queries) == 1 else queries
