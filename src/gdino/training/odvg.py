"""ODVG jsonl (Open-GroundingDino's training format) as training data.

One JSON object a line: ``{"filename": "a.jpg", "height": 480, "width": 640, ...}`` with

* ``"detection": {"instances": [{"bbox": [x0, y0, x1, y1], "label": 0, "category": "dog"}]}``:
  detection data; labels are the label map's (``{"0": "person", "1": "bicycle"}``, keys are the
  ``label`` values), or, without one, the ``label``/``category`` pairs found in the file;
* ``"grounding": {"caption": "...", "regions": [{"bbox": [x0, y0, x1, y1], "phrase": "a dog"}]}``:
  grounding data; the caption is kept, and each region's phrase is located in it (its
  ``tokens_positive`` character spans when given, else the phrase's first whole-word occurrence).

Boxes are pixels, ``x0, y0, x1, y1``. A record with both keys is read as detection data when a
label map is given and as grounding data otherwise (Open-GroundingDino chooses the same way).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from gdino.processing.image import ImageError
from gdino.training.samples import DataError, Dataset, Phrase, Problem, Sample, as_boxes, check_box, check_image

LabelMap = dict[int, str]


def read_label_map(source: str | Path | dict[Any, str]) -> LabelMap:
    """``{"0": "person", ...}`` (a file or a dict) -> ``{0: "person", ...}``.

    Raises:
        DataError: unreadable file, a key that is not an integer, or a name that is not a string.
    """
    raw = source
    if not isinstance(source, dict):
        try:
            raw = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read the label map {source}: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f'the label map {source} must be a non-empty object {{"0": "person", ...}}')
    out: LabelMap = {}
    for key, name in raw.items():
        try:
            out[int(key)] = name
        except (TypeError, ValueError):
            raise DataError(f"label map key {key!r} is not an integer") from None
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"label map entry {key!r} has no name")
    return out


def read_odvg(
    annotations: str | Path,
    images: str | Path | None = None,
    label_map: str | Path | dict[Any, str] | None = None,
    check_images: bool = True,
) -> Dataset:
    """Reads an ODVG jsonl file.

    Args:
        annotations: the ``.jsonl`` file.
        images: the folder ``filename`` is relative to; the file's folder when ``None``.
        label_map: the label map (file or dict); for detection records without one, the labels are
            the ``label``/``category`` pairs of the file.
        check_images: open each image's header to check it is readable and of the stated size.
    """
    path = Path(annotations)
    root = Path(images) if images is not None else path.parent
    file = str(path)
    problems: list[Problem] = []
    records = list(_lines(path, problems))
    labels = read_label_map(label_map) if label_map is not None else _labels_in_file(records, file, problems)
    ids = sorted(labels)
    index = {label: i for i, label in enumerate(ids)}
    samples = []
    for line, record in records:
        where = f"line {line}"
        try:
            sample = _sample(record, root, index, label_map is not None, check_images)
        except (ValueError, TypeError, KeyError, ImageError) as e:
            problems.append(Problem(file, where, f"{e}"))
            continue
        samples.append(replace(sample, origin=f"{file}: {where}"))
    return Dataset(tuple(samples), tuple(labels[i] for i in ids), tuple(ids), tuple(problems), file)


def _lines(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of each non-blank line that is a JSON object."""
    try:
        handle = open(path, encoding="utf-8")  # noqa: SIM115 (opened apart from the with: its error is the file's)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    with handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), f"line {number}", f"not JSON: {e}"))
                continue
            if not isinstance(record, dict):
                problems.append(Problem(str(path), f"line {number}", "not a JSON object"))
                continue
            yield number, record


def _labels_in_file(records: list[tuple[int, dict[str, Any]]], file: str, problems: list[Problem]) -> LabelMap:
    """The ``label`` -> ``category`` pairs of the detection records; conflicting names reported."""
    labels: LabelMap = {}
    for line, record in records:
        try:
            instances = _instances(record) if "detection" in record else []
        except ValueError:
            continue  # reported when the record is read
        for obj in instances:
            label, name = obj.get("label"), obj.get("category")
            if not isinstance(label, int) or not isinstance(name, str) or not name.strip():
                continue  # reported when the record is read
            if labels.setdefault(label, name) != name:
                problems.append(
                    Problem(
                        file,
                        f"line {line}",
                        f"label {label} is named both {labels[label]!r} and "
                        f"{name!r}; keeping the first (give a label map to settle it)",
                    )
                )
    return labels


def _instances(record: dict[str, Any]) -> list[dict[str, Any]]:
    detection = record["detection"]
    if not isinstance(detection, dict) or not isinstance(detection.get("instances"), list):
        raise ValueError("'detection' needs an 'instances' list")
    return [obj if isinstance(obj, dict) else {} for obj in detection["instances"]]


def _sample(record: dict[str, Any], root: Path, index: dict[int, int], have_map: bool, check_images: bool) -> Sample:
    """The sample of one record; ValueError/ImageError says what is wrong with it."""
    name = record.get("filename")
    if not isinstance(name, str) or not name:
        raise ValueError("no 'filename'")
    path = root / name
    width, height = record.get("width"), record.get("height")
    if check_images:
        width, height = check_image(path, width, height)
    elif not isinstance(width, int) or not isinstance(height, int):
        raise ValueError("no integer 'width'/'height'")
    grounding = "grounding" in record and not (have_map and "detection" in record)
    if grounding:
        return _grounding(record["grounding"], path, width, height)
    if "detection" not in record:
        raise ValueError("neither 'detection' nor 'grounding'")
    boxes, labels = [], []
    for k, obj in enumerate(_instances(record)):
        if obj.get("label") not in index:
            raise ValueError(f"instance {k}: unknown label {obj.get('label')!r} ({obj.get('category')!r})")
        boxes.append(_box(obj, width, height, f"instance {k}"))
        labels.append(index[obj["label"]])
    return Sample(path, width, height, as_boxes(boxes), tuple(labels))


def _box(obj: dict[str, Any], width: int, height: int, what: str) -> tuple[float, float, float, float]:
    bbox = obj.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"{what}: bbox must be [x0, y0, x1, y1], got {bbox!r}")
    try:
        return check_box(bbox, width, height)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _grounding(grounding: Any, path: Path, width: int, height: int) -> Sample:
    if not isinstance(grounding, dict) or not isinstance(grounding.get("caption"), str):
        raise ValueError("'grounding' needs a 'caption' string")
    caption, regions = grounding["caption"], grounding.get("regions")
    if not caption.strip() or not isinstance(regions, list):
        raise ValueError("'grounding' needs a non-empty caption and a 'regions' list")
    found: dict[str, tuple[tuple[int, int], ...]] = {}
    boxes, texts = [], []
    for k, region in enumerate(regions):
        region = region if isinstance(region, dict) else {}
        phrase = region.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"region {k}: no 'phrase'")
        spans = _spans(caption, phrase, region.get("tokens_positive"), k)
        if found.setdefault(phrase, spans) != spans:
            raise ValueError(f"region {k}: phrase {phrase!r} is given two different spans")
        boxes.append(_box(region, width, height, f"region {k}"))
        texts.append(phrase)
    order = sorted(found, key=lambda p: found[p])  # phrases in caption order
    phrases = tuple(Phrase(p, found[p]) for p in order)
    labels = tuple(order.index(t) for t in texts)
    return Sample(path, width, height, as_boxes(boxes), labels, caption, phrases)


def _spans(caption: str, phrase: str, given: Any, k: int) -> tuple[tuple[int, int], ...]:
    """Where ``phrase`` is in ``caption``: the given character spans, or its first occurrence."""
    if given is not None:
        try:
            spans = tuple((int(s), int(e)) for s, e in given)
        except (TypeError, ValueError):
            raise ValueError(f"region {k}: tokens_positive must be [[start, end], ...], got {given!r}") from None
        if not spans or any(not 0 <= s < e <= len(caption) for s, e in spans):
            raise ValueError(
                f"region {k}: tokens_positive {given!r} is not inside the {len(caption)}-character caption"
            )
        return spans
    text = phrase.strip()
    match = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", caption, re.IGNORECASE)
    start = match.start() if match else caption.lower().find(text.lower())
    if start < 0:
        raise ValueError(f"region {k}: phrase {phrase!r} is not in the caption {caption[:80]!r}")
    return ((start, start + len(text)),)
