"""How a prompt is read: the one rule for strings, label lists and per-image prompts.

``detect`` (and everything built on it: ``gdino detect``, ``gdino label``, the server) reads its
text by type alone, never by the number of images or by what the strings contain:

* a ``str`` is a phrase prompt: ``"a cat. a remote control."`` has the phrases "a cat" and
  "a remote control" (a box's score is its best token's; ``text_threshold`` applies);
* a list (or tuple) of strings is ONE label list, shared by every image: ``["st. bernard"]`` is
  the single label "st. bernard", with one image or ten;
* a list of lists is one label list per image (a single inner list is shared by all images);
* ``labels=[...]`` says "this is a label list" explicitly, and ``prompts=[...]`` gives exactly one
  prompt per image, each a string (phrases) or a list of labels.

Anything else (e.g. strings and lists mixed in one ``prompt``) is refused with a ``PromptError``.

A label is written into the prompt lower-cased, with ``"."``, ``"?"`` (which end a phrase inside
the model) and ``"_"`` as spaces (:func:`prompt_text`): ``"St. Bernard"`` -> ``"st bernard"``,
``"traffic_light"`` -> ``"traffic light"``. Two labels written the same way (``"cat"`` and
``"Cat"``) are refused as duplicates: class ids would be ambiguous (:func:`check_labels`).

The processor (``GroundingDinoProcessor``, a drop-in for transformers') reads ``text=`` as
transformers does, so code written for transformers gets the same inputs (:func:`processor_prompts`):
a list of strings none of which holds ``"."`` is one label list, a list of strings some of which
hold ``"."`` is one phrase prompt per image, and a list of such items is one per image. Its
label lists are written with :func:`prompt_text` too, so the processor and ``detect`` tokenise a
label the same way; this differs from transformers only for labels holding ``"_"`` or ``"?"``
(transformers keeps ``"_"`` as a token of its own and lets ``"?"`` end a phrase inside a label).
``labels=`` works there too and removes the guessing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from gdino.processing.text import PromptError

TextInput = str | Sequence[str] | Sequence[str | Sequence[str]]  # what detect and the processor take

Prompt = str | tuple[str, ...]  # a normalised phrase prompt, or a checked label list

_PROMPT_BREAKERS = re.compile(r"[.?_]")


# --------------------------------------------------------------------------- phrase prompts


def normalize_prompt(prompt: str) -> str:
    """Lower-cases ``prompt``, strips surrounding whitespace and makes it end with ``"."``.

    Raises:
        PromptError: if ``prompt`` is not a string or is empty / whitespace only.
    """
    if not isinstance(prompt, str):
        raise PromptError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip().lower()
    if not text:
        raise PromptError("the text prompt is empty; give e.g. 'a cat. a remote control.'")
    return text if text.endswith(".") else text + "."


def prompt_from_text(text: str) -> str | list[str]:
    """The command line's and the server's rule for one line of text: with "." it is a phrase
    prompt; without "." but with commas, a label list (``"cat, remote control"`` -> two labels)."""
    if "." not in text and "," in text:
        return [label.strip() for label in text.split(",") if label.strip()]
    return text


# --------------------------------------------------------------------------- labels


def prompt_text(label: str) -> str:
    """How a label is written in the prompt: ``"St. Bernard_dog"`` -> ``"st bernard dog"``."""
    return " ".join(_PROMPT_BREAKERS.sub(" ", label.lower()).split())


def label_texts(labels: Sequence[str]) -> list[str]:
    """Each label as written in the prompt (:func:`prompt_text`); duplicates are not checked here.

    Raises:
        PromptError: a string instead of a list, an empty list, a label that is not a string or
            has no words.
    """
    if isinstance(labels, str):
        raise PromptError(f"a label list must be a list of strings, e.g. [{labels!r}], not a string")
    if not isinstance(labels, (list, tuple)):
        raise PromptError(f"a label list must be a list of strings, got {type(labels).__name__}")
    if len(labels) == 0:
        raise PromptError("the list of labels is empty; give at least one label, e.g. ['cat']")
    texts = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise PromptError(f"label {i} must be a string, got {type(label).__name__}")
        text = prompt_text(label)
        if not text:
            raise PromptError(f"label {i} ({label!r}) is empty or has only separators such as '.'")
        texts.append(text)
    return texts


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """The labels as given, once checked: strings with words, no two written the same way.

    Raises:
        PromptError: as :func:`label_texts`, or two labels that are the same to the model.
    """
    texts = label_texts(labels)
    first: dict[str, int] = {}
    for j, text in enumerate(texts):
        i = first.setdefault(text, j)
        if i == j:
            continue
        if labels[i] == labels[j]:
            raise PromptError(f"label {labels[j]!r} is given twice (labels {i} and {j}); class ids would be ambiguous")
        raise PromptError(
            f"labels {i} ({labels[i]!r}) and {j} ({labels[j]!r}) are the same label to the model "
            f"({text!r}: lower-cased, '.', '?' and '_' as spaces); class ids would be ambiguous"
        )
    return tuple(labels)


def join_labels(labels: Sequence[str]) -> str:
    """A label list as one prompt: ``["A cat", "traffic_light"]`` -> ``"a cat. traffic light."``."""
    return ". ".join(label_texts(labels)) + "."


# --------------------------------------------------------------------------- detect's rule


def read_prompts(prompt: object, n_images: int, *, labels: object = None, prompts: object = None) -> list[Prompt]:
    """``detect``'s rule (see the module docstring): one phrase prompt or label list per image.

    Args:
        prompt: a string, a list of strings (one label list) or a list of lists (one per image).
        n_images: how many images the prompts are for.
        labels: a label list, shared by all images.
        prompts: one prompt per image, each a string or a list of labels.

    Returns:
        ``n_images`` entries: a normalised phrase prompt (``str``) or the labels (``tuple``).
        A prompt shared by all images is the same object in every entry.

    Raises:
        PromptError: not exactly one of the three given, an empty or malformed prompt, duplicate
            labels, or a number of prompts that does not match the images.
    """
    named = (("prompt", prompt), ("labels", labels), ("prompts", prompts))
    given = [name for name, value in named if value is not None]
    if len(given) != 1:
        raise PromptError(
            "give a prompt ('a cat. a remote control.'), labels=['cat', 'remote control'] or "
            f"prompts=[one per image]; got {' and '.join(given) if given else 'none'}"
        )
    if labels is not None:
        return [check_labels(labels)] * n_images  # type: ignore[arg-type]
    if prompts is not None:
        return _per_image(prompts, n_images)
    if isinstance(prompt, str):
        return [normalize_prompt(prompt)] * n_images
    if not isinstance(prompt, (list, tuple)):
        raise PromptError(f"the prompt must be a string or a list of labels, got {type(prompt).__name__}")
    if len(prompt) == 0 or all(isinstance(p, str) for p in prompt):
        return [check_labels(prompt)] * n_images
    if not any(isinstance(p, (list, tuple)) for p in prompt):
        bad = next(i for i, p in enumerate(prompt) if not isinstance(p, str))
        raise PromptError(f"labels must be strings; label {bad} is {prompt[bad]!r} ({type(prompt[bad]).__name__})")
    if not all(isinstance(p, (list, tuple)) for p in prompt):
        raise PromptError(
            "the prompt mixes strings and lists: a list of strings is one label list for every "
            "image, a list of lists one label list per image; give one phrase prompt or label "
            "list per image as prompts=[...]"
        )
    if len(prompt) == 1:
        return [check_labels(prompt[0])] * n_images
    if len(prompt) != n_images:
        raise PromptError(f"got {len(prompt)} label lists for {n_images} images; give one, or one per image")
    return [check_labels(p) for p in prompt]


def _per_image(prompts: object, n_images: int) -> list[Prompt]:
    """``prompts=``: exactly one string or label list per image."""
    if not isinstance(prompts, (list, tuple)):
        raise PromptError(f"prompts= takes a list with one prompt per image, got {type(prompts).__name__}")
    if len(prompts) != n_images:
        raise PromptError(
            f"prompts= has {len(prompts)} entries for {n_images} images; give one per image "
            "(or one prompt for all images as prompt= / labels=)"
        )
    out: list[Prompt] = []
    for i, item in enumerate(prompts):
        if isinstance(item, str):
            out.append(normalize_prompt(item))
        elif isinstance(item, (list, tuple)):
            out.append(check_labels(item))
        else:
            raise PromptError(f"prompts[{i}] must be a string or a list of labels, got {type(item).__name__}")
    return out


# --------------------------------------------------------------------------- the processor's rule


def processor_prompts(text: object, labels: object = None) -> list[str]:
    """The processor's ``text=`` (transformers' rule) or ``labels=`` -> normalised prompts.

    * ``"a cat. a remote control"`` -> one prompt;
    * ``["cat", "remote control"]`` (no string holds ``"."``) -> one prompt of labels;
    * a list whose items are prompts or label lists -> one prompt per item (per image).

    Returns:
        The prompts, lower-case and ending in ``"."``; length 1 for a single prompt.

    Raises:
        PromptError: both or neither of ``text`` and ``labels``, or an empty or malformed prompt.
    """
    if text is not None and labels is not None:
        raise PromptError("give text or labels, not both")
    if labels is not None:
        return [join_labels(labels)]  # type: ignore[arg-type]
    if isinstance(text, str):
        return [normalize_prompt(text)]
    if not isinstance(text, (list, tuple)):
        raise PromptError(f"text must be a string or a list, got {type(text).__name__}")
    if len(text) == 0:
        raise PromptError("text is an empty list; give a prompt or a list of labels")
    if all(isinstance(t, str) and "." not in t for t in text):
        return [join_labels(text)]
    prompts = []
    for item in text:
        if isinstance(item, str):
            prompts.append(normalize_prompt(item))
        elif isinstance(item, (list, tuple)):
            prompts.append(join_labels(item))
        else:
            raise PromptError(f"each prompt must be a string or a list of labels, got {type(item).__name__}")
    return prompts


def prompts_for_images(prompts: list[str], n_images: int) -> list[str]:
    """One prompt per image: a single prompt is repeated; otherwise the counts must agree."""
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise PromptError(f"got {len(prompts)} prompts for {n_images} images; give one prompt, or one per image")
    return prompts
