"""YOLO folders (the Ultralytics layout ``gdino label --format yolo`` writes) as training data.

``DIR/images/<path>`` are the images, ``DIR/labels/<path>.txt`` their boxes (``class cx cy w h``
normalised to the image as seen, EXIF orientation applied) or segmentation polygons (``class x1 y1
x2 y2 ...``, three points or more, as ``yolo segment train`` reads them and ``gdino label --masks``
writes them; the box is the polygon's bounds, and ``read_objects`` gives the polygon),
``DIR/classes.txt`` the class names one a line (else the ``names:`` of ``DIR/data.yaml``). An image
without a label file has no objects, as Ultralytics reads it; a label file without an image is
reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gdino.processing.image import ImageError
from gdino.training.samples import DataError, Dataset, Problem, Sample, as_boxes, check_box, check_image

IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
_YAML_NAME = re.compile(r"^\s+(\d+)\s*:\s*(.+?)\s*$")


@dataclass(frozen=True)
class YoloObject:
    """One line of a label file, in pixels of the image.

    Attributes:
        label: the class id.
        box: x0, y0, x1, y1, clipped to the image (a polygon's bounds for a segmentation line).
        polygon: (K, 2) float32 x y of a segmentation line's points; None for a box line.
    """

    label: int
    box: tuple[float, float, float, float]
    polygon: np.ndarray | None = None


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
    objects, errors = read_objects(label_file, n_classes, width, height)
    for number, reason in errors:
        problems.append(Problem(str(label_file), f"line {number}", f"{reason}; image skipped"))
    if errors:
        return None
    boxes, labels = as_boxes([o.box for o in objects]), tuple(o.label for o in objects)
    return Sample(image, width, height, boxes, labels, origin=str(label_file))


def read_objects(
    label_file: Path, n_classes: int, width: int, height: int
) -> tuple[list[YoloObject], list[tuple[int, str]]]:
    """The objects of one label file (none when there is no file), and (line number, reason) of
    each line that cannot be read."""
    objects, errors = [], []
    lines = label_file.read_text(encoding="utf-8").splitlines() if label_file.is_file() else []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            objects.append(_line(line, n_classes, width, height))
        except ValueError as e:
            errors.append((number, str(e)))
    return objects, errors


def _line(line: str, n_classes: int, width: int, height: int) -> YoloObject:
    fields = line.split()
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        raise ValueError(
            f"expected 'class cx cy w h', got {len(fields)} fields (or a polygon 'class x1 y1 x2 y2 x3 y3 ...')"
        )
    try:
        label = int(fields[0])
        values = np.array([float(v) for v in fields[1:]], np.float64)
    except ValueError:
        raise ValueError(f"not numbers: {line.strip()!r}") from None
    if not 0 <= label < n_classes:
        raise ValueError(f"class {label} is not in the {n_classes} classes")
    if len(fields) == 5:
        cx, cy, w, h = values
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        return YoloObject(label, check_box(box, width, height))
    points = values.reshape(-1, 2) * (width, height)  # (K, 2) pixels
    if not np.isfinite(points).all():
        raise ValueError("a polygon point is not finite")
    box = (*points.min(axis=0), *points.max(axis=0))  # Ultralytics' segments2boxes: the polygon's bounds
    return YoloObject(label, check_box(box, width, height), points.astype(np.float32))
