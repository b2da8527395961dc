"""YOLO folders (the Ultralytics layout ``gdino label --format yolo`` writes) as training data.

``DIR/images/<path>`` are the images, ``DIR/labels/<path>.txt`` their boxes (``class cx cy w h``
normalised to the image as seen, EXIF orientation applied), ``DIR/classes.txt`` the class names
one a line (else the ``names:`` of ``DIR/data.yaml``). An image without a label file has no
objects, as Ultralytics reads it; a label file without an image is reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gdino.processing.image import ImageError
from gdino.training.samples import DataError, Dataset, Problem, Sample, as_boxes, check_box, check_image

IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
_YAML_NAME = re.compile(r"^\s+(\d+)\s*:\s*(.+?)\s*$")


def read_classes(folder: Path) -> list[str]:
    """The class names: ``classes.txt``, else the ``names:`` mapping of ``data.yaml``.

    Raises:
        DataError: neither file is there or they name no class.
    """
    classes_txt, yaml = folder / "classes.txt", folder / "data.yaml"
    if classes_txt.is_file():
        names = [line.strip() for line in classes_txt.read_text(encoding="utf-8").splitlines()]
        while names and not names[-1]:
            names.pop()
    elif yaml.is_file():
        names = _yaml_names(yaml.read_text(encoding="utf-8"))
    else:
        raise DataError(f"{folder} has neither classes.txt nor data.yaml: which classes are the label ids?")
    if not names or not all(names):
        raise DataError(f"{folder}: the class list is empty or has a blank name")
    return names


def _yaml_names(text: str) -> list[str]:
    """The ``names:`` block of a data.yaml written as ``  0: "cat"`` lines (what gdino writes)."""
    names: dict[int, str] = {}
    inside = False
    for line in text.splitlines():
        if line.startswith("names:"):
            inside = True
            continue
        match = _YAML_NAME.match(line) if inside else None
        if match is None:
            inside = inside and not line.strip()
            continue
        value = match.group(2)
        names[int(match.group(1))] = json.loads(value) if value.startswith('"') else value.strip("'")
    return [names.get(i, "") for i in range(max(names) + 1)] if names else []


def read_yolo(folder: str | Path) -> Dataset:
    """Reads a YOLO folder; labels are the class ids, names from ``classes.txt``.

    Raises:
        DataError: no ``images/`` folder or no class list.
    """
    root = Path(folder)
    if not (root / "images").is_dir():
        raise DataError(f"{root} has no images/ folder (expected the YOLO layout gdino label writes)")
    names = read_classes(root)
    problems: list[Problem] = []
    images = sorted(p for p in (root / "images").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    wanted = set()
    samples = []
    for image in images:
        label_file = (root / "labels" / image.relative_to(root / "images")).with_suffix(".txt")
        wanted.add(label_file)
        sample = _sample(image, label_file, len(names), problems)
        if sample is not None:
            samples.append(sample)
    if (root / "labels").is_dir():
        for orphan in sorted(set((root / "labels").rglob("*.txt")) - wanted):
            problems.append(Problem(str(orphan), "file", "no image for this label file"))
    return Dataset(tuple(samples), tuple(names), tuple(range(len(names))), tuple(problems), str(root))


def _sample(image: Path, label_file: Path, n_classes: int, problems: list[Problem]) -> Sample | None:
    try:
        width, height = check_image(image, None, None)
    except ImageError as e:
        problems.append(Problem(str(image), "image", str(e)))
        return None
    boxes, labels, bad = [], [], False
    lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.is_file() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            label, box = _line(line, n_classes, width, height)
        except ValueError as e:
            problems.append(Problem(str(label_file), f"line {number}", f"{e}; image skipped"))
            bad = True
            continue
        boxes.append(box)
        labels.append(label)
    if bad:
        return None
    return Sample(image, width, height, as_boxes(boxes), tuple(labels), origin=str(label_file))


def _line(line: str, n_classes: int, width: int, height: int) -> tuple[int, tuple[float, float, float, float]]:
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"expected 'class cx cy w h', got {len(fields)} fields")
    try:
        label = int(fields[0])
        cx, cy, w, h = (float(v) for v in fields[1:])
    except ValueError:
        raise ValueError(f"not numbers: {line.strip()!r}") from None
    if not 0 <= label < n_classes:
        raise ValueError(f"class {label} is not in the {n_classes} classes")
    box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
    return label, check_box(box, width, height)
