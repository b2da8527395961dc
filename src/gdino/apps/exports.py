"""Detections of a folder of images written in the formats labelling tools and trainers read.

A record is what ``gdino detect`` prints for one image, with ``image`` relative to the folder:
``{"image": "sub/a.jpg", "width": 640, "height": 480, "detections": [{"box": [x0, y0, x1, y1],
"score": 0.87, "label": "cat", "label_id": 0}, ...]}``. Boxes are pixels of the image as seen
(EXIF orientation applied).

* ``coco``: ``annotations.json``; image ids 1.. in record order, category ids 1.. in class order
  (``label_id + 1``), ``bbox`` [x, y, w, h] clipped to the image, ``score`` kept per annotation.
* ``yolo``: Ultralytics layout: ``labels/<path>.txt`` per image ("class cx cy w h", normalised,
  one box a line; empty for an image with nothing found), ``images/<path>`` links to the images,
  ``classes.txt`` and ``data.yaml``; ``yolo train data=OUT/data.yaml`` reads it as it is.
* ``voc``: Pascal VOC ``Annotations/<path>.xml`` per image, integer pixel boxes clipped to it.
* ``jsonl``: ``detections.jsonl``, the records one a line, boxes as the model gave them.

With masks (``gdino label --masks``: each detection also has ``"mask"``, COCO RLE, and
``"mask_score"``), COCO annotations gain ``segmentation`` (polygons, or RLE) with the mask's
``area``, YOLO lines become segmentation polygons, VOC gains ``SegmentationObject/`` and
``SegmentationClass/`` PNGs, and JSON Lines keeps the RLE: ``gdino.apps.mask_exports``.

Every file is written to a temporary name and renamed, so a killed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from xml.etree import ElementTree

from gdino.utils.files import write_atomic

Record = dict[str, Any]

FORMATS = ("coco", "yolo", "voc", "jsonl")
VOC_MASK_FOLDERS = ("SegmentationObject", "SegmentationClass")


Clipped = tuple[float, float, float, float, int, float]  # x0, y0, x1, y1, label_id, score


def clipped_boxes(record: Record) -> list[Clipped]:
    """``(x0, y0, x1, y1, label_id, score)`` of each detection, clipped to the image; empty boxes dropped."""
    return [box for box, _ in clipped_detections(record)]


def clipped_detections(record: Record) -> list[tuple[Clipped, dict[str, Any]]]:
    """``clipped_boxes`` with each box's detection (for its mask)."""
    width, height = record["width"], record["height"]
    out = []
    for det in record["detections"]:
        x0, y0, x1, y1 = det["box"]
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 > x0 and y1 > y0:
            out.append(((x0, y0, x1, y1, int(det["label_id"]), float(det["score"])), det))
    return out


# --------------------------------------------------------------------------- COCO


def coco_dataset(records: Sequence[Record], classes: Sequence[str], mask_format: str = "polygon") -> dict[str, Any]:
    """A COCO detection dataset (``pycocotools.coco.COCO`` loads it), one image per record; a detection
    with a mask adds ``segmentation`` (``mask_format``: "polygon" or "rle"), ``area`` from the mask,
    and ``mask_score``."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, record in enumerate(records, start=1):
        images.append(
            {"id": image_id, "file_name": record["image"], "width": record["width"], "height": record["height"]}
        )
        for (x0, y0, x1, y1, label_id, score), det in clipped_detections(record):
            w, h = round(x1 - x0, 2), round(y1 - y0, 2)
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label_id + 1,
                "bbox": [round(x0, 2), round(y0, 2), w, h],
                "area": round(w * h, 2),
                "iscrowd": 0,
                "score": score,
            }
            if "mask" in det:
                from gdino.apps import mask_exports  # numpy, pycocotools, OpenCV: only for masks

                annotation.update(mask_exports.coco_segmentation(det["mask"], mask_format))
                annotation["mask_score"] = det.get("mask_score")
            annotations.append(annotation)
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- YOLO


def yolo_label_path(image: str) -> PurePosixPath:
    """``sub/a.jpg`` -> ``labels/sub/a.txt`` (Ultralytics finds labels by swapping images/ for labels/)."""
    return PurePosixPath("labels", image).with_suffix(".txt")


def yolo_labels(record: Record) -> str:
    """One line per box: ``class cx cy w h`` normalised to the image, 6 decimals; for a detection with
    a mask, its polygon instead (``class x1 y1 x2 y2 ...``, ``mask_exports.yolo_segment_line``)."""
    width, height = record["width"], record["height"]
    lines = []
    for (x0, y0, x1, y1, label_id, _), det in clipped_detections(record):
        if "mask" in det:
            from gdino.apps import mask_exports

            line = mask_exports.yolo_segment_line(label_id, det["mask"], width, height)
            lines += [line] if line is not None else []
            continue
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        w, h = (x1 - x0) / width, (y1 - y0) / height
        lines.append(f"{label_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def yolo_data_yaml(classes: Sequence[str], root: Path) -> str:
    """Ultralytics' dataset file: root, train/val folders and the class names by id."""
    names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in enumerate(classes))
    return (
        f"# written by gdino label; every image is in both splits: split them before training\n"
        f"path: {json.dumps(str(root))}\ntrain: images\nval: images\nnc: {len(classes)}\nnames:\n{names}"
    )


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (a symbolic link, or a copy where links are not allowed), replaced atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
    except OSError:
        shutil.copy2(target, tmp)
    os.replace(tmp, link)


# --------------------------------------------------------------------------- Pascal VOC


def voc_label_path(image: str) -> PurePosixPath:
    """``sub/a.jpg`` -> ``Annotations/sub/a.xml``."""
    return PurePosixPath("Annotations", image).with_suffix(".xml")


def voc_segmentation_paths(image: str) -> tuple[PurePosixPath, PurePosixPath]:
    """``sub/a.jpg`` -> ``SegmentationObject/sub/a.png``, ``SegmentationClass/sub/a.png``."""
    objects, classes = (PurePosixPath(folder, image).with_suffix(".png") for folder in VOC_MASK_FOLDERS)
    return objects, classes


def voc_objects(record: Record) -> list[tuple[tuple[int, int, int, int], bool, dict[str, Any]]]:
    """The objects of a VOC annotation, in order: integer box, whether it touches the image's edge,
    and the detection; boxes under a pixel wide are left out."""
    objects = []
    for (x0, y0, x1, y1, _, _), det in clipped_detections(record):
        box = (round(x0), round(y0), round(x1), round(y1))
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # under a pixel wide
        touches = x0 <= 0 or y0 <= 0 or x1 >= record["width"] or y1 >= record["height"]
        objects.append((box, touches, det))
    return objects


def voc_xml(record: Record, classes: Sequence[str], image_path: Path, segmented: bool = False) -> str:
    """The Pascal VOC annotation of one image; boxes in integer pixels, clipped to the image;
    ``segmented`` when its SegmentationObject and SegmentationClass PNGs are written."""
    root = ElementTree.Element("annotation")
    _sub(root, "folder", image_path.parent.name)
    _sub(root, "filename", image_path.name)
    _sub(root, "path", str(image_path))
    _sub(_sub(root, "source"), "database", "gdino")
    size = _sub(root, "size")
    for key, value in (("width", record["width"]), ("height", record["height"]), ("depth", 3)):
        _sub(size, key, str(value))
    _sub(root, "segmented", str(int(segmented)))
    for box, touches, det in voc_objects(record):
        obj = _sub(root, "object")
        _sub(obj, "name", classes[int(det["label_id"])])
        _sub(obj, "pose", "Unspecified")
        _sub(obj, "truncated", str(int(touches)))
        _sub(obj, "difficult", "0")
        bndbox = _sub(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            _sub(bndbox, key, str(value))
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n"


def _sub(parent: ElementTree.Element, tag: str, text: str | None = None) -> ElementTree.Element:
    element = ElementTree.SubElement(parent, tag)
    if text is not None:
        element.text = text
    return element


# --------------------------------------------------------------------------- all formats


def jsonl(records: Iterable[Record]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def export(
    records: Sequence[Record],
    classes: Sequence[str],
    fmt: str,
    out: Path,
    image_root: Path,
    warn: Callable[[str], None] | None = None,
    mask_format: str = "polygon",
    masks: bool | None = None,
) -> list[Path]:
    """Writes ``records`` (in this order) under ``out`` in ``fmt``; returns the files written.

    Args:
        records: one per image, ``image`` relative to ``image_root``.
        classes: the class names; ``label_id`` indexes them.
        fmt: one of ``FORMATS``.
        out: the output folder.
        image_root: the folder the images are in.
        warn: called with a message for an image that cannot be written (YOLO and VOC: two images
            whose paths differ only in the extension would share a label file; the first wins; VOC: a
            mask that a PNG cannot hold).
        mask_format: how COCO writes the masks: "polygon" or "rle" (``mask_exports``).
        masks: whether the records are a run with masks (VOC then writes the segmentation PNGs of
            every image, even one with nothing found); None: whether any detection has a mask.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    root = image_root.resolve()
    if fmt == "coco":
        path = out / "annotations.json"
        write_atomic(path, json.dumps(coco_dataset(records, classes, mask_format)) + "\n")
        return [path]
    if fmt == "jsonl":
        path = out / "detections.jsonl"
        write_atomic(path, jsonl(records))
        return [path]
    segmented = any("mask" in det for r in records for det in r["detections"]) if masks is None else masks
    written = _per_image(records, classes, fmt, out, root, warn, segmented)
    if fmt == "yolo":
        for name, text in (
            ("classes.txt", "".join(f"{c}\n" for c in classes)),
            ("data.yaml", yolo_data_yaml(classes, out.resolve())),
        ):
            write_atomic(out / name, text)
            written.append(out / name)
    return written


def export_targets(images: Sequence[str], fmt: str, out: Path, masks: bool = False) -> list[Path]:
    """Every path ``export`` may write under ``out`` for these images (paths relative to the image
    folder, with "/"), in ``fmt`` (``masks``: a run with masks): what a run checks and claims before
    any work."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt in ("coco", "jsonl"):
        return [out / ("annotations.json" if fmt == "coco" else "detections.jsonl")]
    label_path = yolo_label_path if fmt == "yolo" else voc_label_path
    paths = list(dict.fromkeys(out / label_path(image) for image in images))
    if fmt == "yolo":
        paths += [out / "images" / image for image in images] + [out / "classes.txt", out / "data.yaml"]
    if fmt == "voc" and masks:
        paths += list(dict.fromkeys(out / p for image in images for p in voc_segmentation_paths(image)))
    return paths


def _per_image(
    records: Sequence[Record],
    classes: Sequence[str],
    fmt: str,
    out: Path,
    root: Path,
    warn: Callable[[str], None] | None,
    segmented: bool = False,
) -> list[Path]:
    """The YOLO or VOC file of each record (and YOLO's image links, VOC's segmentation PNGs when
    ``segmented``); the first of two that would share a file wins."""
    label_path = yolo_label_path if fmt == "yolo" else voc_label_path
    written: list[Path] = []
    seen: dict[Path, str] = {}
    for record in records:
        target = out / label_path(record["image"])
        if target in seen:
            if warn is not None:
                warn(f"{record['image']} not exported: its {fmt} file {target} is {seen[target]}'s")
            continue
        seen[target] = record["image"]
        if fmt == "yolo":
            write_atomic(target, yolo_labels(record))
            _link(root / record["image"], out / "images" / record["image"])
        else:
            write_atomic(target, voc_xml(record, classes, root / record["image"], segmented))
            if segmented:
                written += _voc_masks(record, out, warn)
        written.append(target)
    return written


def _voc_masks(record: Record, out: Path, warn: Callable[[str], None] | None) -> list[Path]:
    """Writes one image's SegmentationObject and SegmentationClass PNGs; returns their paths."""
    from gdino.apps import mask_exports

    objects = [(int(det["label_id"]), det) for _, _, det in voc_objects(record)]
    pngs = mask_exports.voc_pngs(objects, record["width"], record["height"])
    paths = [out / p for p in voc_segmentation_paths(record["image"])]
    for path, data in zip(paths, pngs[:2]):
        write_atomic(path, data)
    for problem in pngs[2]:
        if warn is not None:
            warn(f"{record['image']}: {problem}")
    return paths
