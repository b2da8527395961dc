"""Label Studio's side of the ML backend protocol, without a web framework: the labelling config's
labels, and gdino's detections as Label Studio prediction results.

* :func:`read_config` reads a project's labelling config (XML): each ``RectangleLabels`` and
  ``BrushLabels`` tool with its ``name``, ``toName``, the image's data key and its labels; a
  label's ``predicted_values`` (comma-separated) and ``alias`` are other names the model may be
  prompted with, and its ``value`` is what Label Studio stores.
* :func:`read_prompt_field` names the config's ``TextArea`` on the image, where a user may type a
  prompt; :func:`values_for_phrases` gives the label each phrase of such a prompt names.
* :func:`results` turns ``Detections`` into ``rectanglelabels`` results (x, y, width, height in
  percent of the image, clipped to it) with scores, and ``brushlabels`` results in Label Studio's brush RLE when
  the detections have masks and the config has a ``BrushLabels`` tool.
* :func:`encode_brush_rle` writes that RLE (the rle-pack format Label Studio's brush tool reads:
  the mask as RGBA bytes, 255 inside, 0 outside).

Bad configs raise :class:`LabelStudioError` with a message meant for Label Studio's user.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gdino.inference.detections import Detections
from gdino.processing.prompts import check_labels
from gdino.processing.text import PromptError

TOOLS = ("RectangleLabels", "BrushLabels")


class LabelStudioError(ValueError):
    """A labelling config, task or request that gdino cannot predict for (the message says why)."""


@dataclass(frozen=True)
class Tool:
    """One labelling tool of the config.

    Attributes:
        kind: "RectangleLabels" or "BrushLabels".
        from_name: the tool's ``name``; to_name: the ``Image`` tag it labels (``toName``).
        image_key: the task data key of that image (its ``value="$image"`` without the "$").
        values: the labels as Label Studio stores them, in the config's order.
        prompts: for each prompt the model gets, the index in ``values`` it stands for.
        prompt_texts: the prompts (each value, then its ``predicted_values`` and ``alias``).
    """

    kind: str
    from_name: str
    to_name: str
    image_key: str
    values: tuple[str, ...]
    prompt_texts: tuple[str, ...]
    prompts: tuple[int, ...]


def read_config(config: str) -> list[Tool]:
    """The config's RectangleLabels and BrushLabels tools.

    Raises:
        LabelStudioError: XML that does not parse, no such tool, a tool without labels, a tool whose
            ``toName`` is no ``Image``, or labels the model cannot tell apart.
    """
    try:
        root = ET.fromstring(config)
    except ET.ParseError as error:
        raise LabelStudioError(f"the labelling config is not valid XML: {error}") from error
    images = {e.get("name"): (e.get("value") or "").lstrip("$") for e in root.iter("Image")}
    tools = [_tool(element, images) for element in root.iter() if element.tag in TOOLS]
    if not tools:
        raise LabelStudioError("the labelling config has no RectangleLabels or BrushLabels tool to predict for")
    return tools


def _tool(element: ET.Element, images: dict[str | None, str]) -> Tool:
    name, to_name = element.get("name") or "", element.get("toName") or ""
    if to_name not in images:
        raise LabelStudioError(f"{element.tag} {name!r} labels {to_name!r}, which is no Image tag of the config")
    values, texts, index = [], [], []
    for label in element.iter("Label"):
        value = label.get("value")
        if not value:
            continue
        values.append(value)
        aliases = [a.strip() for a in (label.get("predicted_values") or "").split(",")] + [label.get("alias") or ""]
        seen: set[str] = set()
        for text in [value, *(a for a in aliases if a)]:
            if text.lower() not in seen:  # an alias that differs only in case adds no prompt
                seen.add(text.lower())
                texts.append(text)
                index.append(len(values) - 1)
    if not values:
        raise LabelStudioError(f"{element.tag} {name!r} has no labels (no <Label value=...>)")
    try:
        check_labels(texts)
    except PromptError as error:
        raise LabelStudioError(f"{element.tag} {name!r}: {error}") from error
    return Tool(element.tag, name, to_name, images[to_name], tuple(values), tuple(texts), tuple(index))


def read_prompt_field(config: str) -> str | None:
    """The ``name`` of the config's first ``TextArea`` on an ``Image`` (where a user types a prompt), or None.

    Raises:
        LabelStudioError: XML that does not parse.
    """
    try:
        root = ET.fromstring(config)
    except ET.ParseError as error:
        raise LabelStudioError(f"the labelling config is not valid XML: {error}") from error
    images = {e.get("name") for e in root.iter("Image")}
    for element in root.iter("TextArea"):
        if element.get("toName") in images and element.get("name"):
            return element.get("name")
    return None


def values_for_phrases(phrases: Sequence[str], tool: Tool) -> list[str | None]:
    """The label value each phrase of a typed prompt's detections stands for, None for none.

    A phrase names a label when it is one of the tool's prompts (a value, predicted value or alias),
    compared lower-cased; a tool with a single label gives it to every phrase.
    """
    if len(tool.values) == 1:
        return [tool.values[0]] * len(phrases)
    named = {text.strip().lower(): tool.values[index] for text, index in zip(tool.prompt_texts, tool.prompts)}
    return [named.get(phrase.strip().lower()) for phrase in phrases]


def results(
    found: Detections, tools: Sequence[Tool], values: Sequence[str | None] | None = None
) -> list[dict[str, Any]]:
    """Label Studio results for detections made with ``tools[0].prompt_texts`` as the label list.

    Each box's label is the value its prompt stands for (or ``values[i]``, when given: a typed
    prompt's, None to leave the box out); every tool holding that value gets a result:
    ``rectanglelabels`` per box for a RectangleLabels tool, ``brushlabels`` per mask for a
    BrushLabels tool when ``found`` has masks.
    """
    prompted = tools[0]
    out: list[dict[str, Any]] = []
    for i in range(len(found)):
        value = prompted.values[prompted.prompts[int(found.label_ids[i])]] if values is None else values[i]
        for tool in tools:
            if value is not None and value in tool.values:
                out.extend(_result(found, i, tool, value))
    return out


def _result(found: Detections, i: int, tool: Tool, value: str) -> list[dict[str, Any]]:
    width, height = found.image_size
    base = {
        "from_name": tool.from_name,
        "to_name": tool.to_name,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": round(float(found.scores[i]), 4),
    }
    if tool.kind == "RectangleLabels":
        return [{**base, "type": "rectanglelabels", "value": _percent_box(found.boxes[i], width, height, value)}]
    if found.masks is None:
        return []
    rle = encode_brush_rle(found.masks.mask(i))
    return [{**base, "type": "brushlabels", "value": {"format": "rle", "rle": rle, "brushlabels": [value]}}]


def _percent_box(box: np.ndarray, width: int, height: int, value: str) -> dict[str, Any]:
    """The box in percent of the image, clipped to it (Label Studio edits regions inside the image only)."""
    x0, x1 = (min(max(float(v), 0.0), float(width)) for v in (box[0], box[2]))
    y0, y1 = (min(max(float(v), 0.0), float(height)) for v in (box[1], box[3]))
    return {
        "x": 100.0 * x0 / width,
        "y": 100.0 * y0 / height,
        "width": 100.0 * (x1 - x0) / width,
        "height": 100.0 * (y1 - y0) / height,
        "rotation": 0,
        "rectanglelabels": [value],
    }


# rle-pack's run lengths: a run's length - 1 is written in one of these many bits (2 bits say which)
_RLE_SIZES = (3, 4, 8, 16)
_WORD = 8


def encode_brush_rle(mask: np.ndarray) -> list[int]:
    """(H, W) bool mask -> Label Studio's brush RLE: the RGBA bytes (255 where the mask is set, every
    channel) as rle-pack writes them, a list of byte values. Runs of equal bytes are written as
    repeats, the rest as literals."""
    data = np.repeat(np.where(np.asarray(mask, bool).reshape(-1), 255, 0).astype(np.uint8), 4)
    bits = _Bits()
    bits.write(len(data), 32)
    bits.write(_WORD - 1, 5)
    for size in _RLE_SIZES:
        bits.write(size - 1, 4)
    for start, stop in _runs(data):
        _write_repeat(bits, int(data[start]), stop - start)
    return bits.bytes()


def _runs(data: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values."""
    if len(data) == 0:
        return []
    edges = np.flatnonzero(np.diff(data)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(data)]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _write_repeat(bits: _Bits, value: int, count: int) -> None:
    """A run of ``count`` bytes ``value``, as repeats of at most 2**16 bytes each."""
    largest = 1 << _RLE_SIZES[-1]
    while count > 0:
        n = min(count, largest)
        size_index = next(k for k, size in enumerate(_RLE_SIZES) if n - 1 < (1 << size))
        bits.write(1, 1)
        bits.write(size_index, 2)
        bits.write(n - 1, _RLE_SIZES[size_index])
        bits.write(value, _WORD)
        count -= n


class _Bits:
    """A big-endian bit writer."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._acc = 0
        self._n = 0

    def write(self, value: int, width: int) -> None:
        self._acc = (self._acc << width) | (value & ((1 << width) - 1))
        self._n += width
        while self._n >= 8:
            self._n -= 8
            self._out.append((self._acc >> self._n) & 0xFF)
        self._acc &= (1 << self._n) - 1

    def bytes(self) -> list[int]:
        tail = [(self._acc << (8 - self._n)) & 0xFF] if self._n else []
        return list(self._out) + tail
