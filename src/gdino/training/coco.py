"""COCO ``instances_*.json`` as training data: category names become the label list.

Labels are the categories sorted by id, so ``Dataset.ids[label]`` is the category id, exactly,
however sparse the ids are (COCO 2017's run 1..90 with gaps). ``iscrowd`` annotations are left
out of training, as DETR does. Images with no annotations are kept: they teach "nothing here".
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from gdino.processing.image import ImageError
from gdino.training.samples import DataError, Dataset, Problem, Sample, as_boxes, check_box, check_image

logger = logging.getLogger(__name__)


def read_coco(annotations: str | Path, images: str | Path | None = None, check_images: bool = True) -> Dataset:
    """Reads a COCO detection file.

    Args:
        annotations: the ``instances_*.json``.
        images: the folder ``file_name`` is relative to; the json's folder when ``None``.
        check_images: open each image's header to check it is readable and of the stated size.

    Raises:
        DataError: the file cannot be read or has no ``images``/``categories`` lists.
    """
    path = Path(annotations)
    root = Path(images) if images is not None else path.parent
    data = _load_json(path)
    file = str(path)
    problems: list[Problem] = []
    names, ids = _categories(data["categories"], file, problems)
    label_of = {cid: i for i, cid in enumerate(ids)}
    infos = _images(data["images"], file, problems)
    per_image: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for k, ann in enumerate(data.get("annotations") or []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in infos:
            problems.append(Problem(file, _where(k, ann), f"image_id {image_id!r} is not in 'images'"))
            continue
        per_image[image_id].append((k, ann))
    samples, crowd = [], 0
    for image_id, info in infos.items():
        sample, skipped = _sample(info, per_image[image_id], label_of, root, file, problems, check_images)
        crowd += skipped
        if sample is not None:
            samples.append(sample)
    if crowd:
        logger.info("%s: %d iscrowd annotations left out of training", file, crowd)
    return Dataset(tuple(samples), tuple(names), tuple(ids), tuple(problems), file)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON: {e}") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("categories"), list)
    ):
        raise DataError(f"{path} is not a COCO detection file (needs 'images' and 'categories' lists)")
    return data


def _where(k: int, ann: object) -> str:
    ident = ann.get("id") if isinstance(ann, dict) else None
    return f"annotations[{k}]" + (f" (id {ident})" if ident is not None else "")


def _categories(categories: list[Any], file: str, problems: list[Problem]) -> tuple[list[str], list[int]]:
    """Category names and ids, sorted by id; bad or repeated categories reported."""
    seen: dict[int, str] = {}
    for k, cat in enumerate(categories):
        where = f"categories[{k}]"
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            problems.append(Problem(file, where, f"a category needs an integer 'id', got {cat!r}"))
        elif not isinstance(cat.get("name"), str) or not cat["name"].strip():
            problems.append(Problem(file, where, f"category id {cat['id']} has no name"))
        elif cat["id"] in seen:
            problems.append(Problem(file, where, f"category id {cat['id']} is repeated ({seen[cat['id']]!r})"))
        else:
            seen[cat["id"]] = cat["name"]
    ids = sorted(seen)
    return [seen[i] for i in ids], ids


def _images(images: list[Any], file: str, problems: list[Problem]) -> dict[int, dict[str, Any]]:
    infos: dict[int, dict[str, Any]] = {}
    for k, info in enumerate(images):
        where = f"images[{k}]"
        if not isinstance(info, dict) or "id" not in info or not isinstance(info.get("file_name"), str):
            problems.append(Problem(file, where, "an image needs 'id' and 'file_name'"))
        elif info["id"] in infos:
            problems.append(Problem(file, where, f"image id {info['id']!r} is repeated"))
        else:
            infos[info["id"]] = info
    return infos


def _sample(
    info: dict[str, Any],
    anns: list[tuple[int, dict[str, Any]]],
    label_of: dict[int, int],
    root: Path,
    file: str,
    problems: list[Problem],
    check_images: bool,
) -> tuple[Sample | None, int]:
    """One image's sample, or None (and problems) if the image or any annotation is bad."""
    path = root / info["file_name"]
    width, height = info.get("width"), info.get("height")
    try:
        if check_images:
            width, height = check_image(path, width, height)
        elif not isinstance(width, int) or not isinstance(height, int):
            raise ImageError("the image record has no integer width/height")
    except ImageError as e:
        problems.append(Problem(file, f"image id {info['id']} ({info['file_name']})", str(e)))
        return None, 0
    boxes, labels, crowd, bad = [], [], 0, False
    for k, ann in anns:
        if ann.get("iscrowd"):
            crowd += 1
            continue
        try:
            if ann.get("category_id") not in label_of:
                raise ValueError(f"unknown category_id {ann.get('category_id')!r}")
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"bbox must be [x, y, w, h], got {bbox!r}")
            x, y, w, h = bbox
            boxes.append(check_box((x, y, x + w, y + h), width, height))
            labels.append(label_of[ann["category_id"]])
        except (TypeError, ValueError) as e:
            problems.append(Problem(file, _where(k, ann), f"{e}; image {info['file_name']!r} skipped"))
            bad = True
    if bad:
        return None, crowd
    return Sample(
        path, int(width), int(height), as_boxes(boxes), tuple(labels), origin=f"{file}: image id {info['id']}"
    ), crowd
