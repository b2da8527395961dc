"""``gdino label DIR --classes "cat,dog" --format coco --out OUT``: pre-labels a folder of images.

Images are found recursively (sorted; hidden folders, OUT and links into OUT left out; OUT may not
be the images' folder itself) and detected in batches while the next batch is read. Each batch's
records are appended to a journal (``OUT/.gdino-label.jsonl``, synced to disk) before the next
one starts, so a run that is killed and started again skips the images already done; the export
is written from the journal at the end, in folder order, so it is byte for byte what an
uninterrupted run writes. An image that cannot be read or detected goes to ``OUT/errors.txt``
(path, tab, reason) and is tried again by the next run; it never stops the run. With a segmenter
(``--masks``) each detection's mask is journaled as COCO RLE (``gdino.apps.mask_exports``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image

from gdino.apps.exports import FORMATS, Record, export, export_targets
from gdino.processing.image import ImageError, load_image
from gdino.processing.prompts import check_labels
from gdino.processing.text import PromptError
from gdino.utils.files import write_atomic
from gdino.utils.progress import Progress, read_ahead

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
JOURNAL = ".gdino-label.jsonl"
MANIFEST = ".gdino-label-files.txt"  # every file this OUT's exports have written, relative to OUT
ERRORS = "errors.txt"
EXPORT_FOLDERS = ("images", "labels", "Annotations", "SegmentationObject", "SegmentationClass")  # what exports write

Detect = Callable[[list[Image.Image]], list[Any]]  # images -> Detections, one per image


class LabelError(ValueError):
    """The run cannot start: no images, bad classes, or OUT holds a run with other settings."""


@dataclass(frozen=True)
class Settings:
    """What the detections depend on; a journal is only resumed with the same settings."""

    classes: tuple[str, ...]
    model: str
    box_threshold: float | None  # None: the model's default
    nms_threshold: float | None
    masks: str | None = None  # the segmenter (--masks), or None for boxes only
    tiles: str | None = None  # the tile settings (--tile ...), or None for whole images


@dataclass(frozen=True)
class Summary:
    images: int
    resumed: int
    errors: int
    boxes: int
    files: tuple[Path, ...]


def parse_classes(text: str) -> list[str]:
    """``"cat, dog"`` -> ["cat", "dog"]; the name of an existing file -> its lines (blank ones skipped).

    Raises:
        LabelError: no classes, or one given twice (``gdino.processing.prompts.check_labels``: "Cat" and
            "cat" count as the same class).
    """
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        names = [name.strip() for name in text.split(",")]
    names = [n for n in names if n]
    if not names:
        raise LabelError(f"no classes in {text!r}; give e.g. --classes 'cat,dog' or a file with one class a line")
    try:
        check_labels(names)  # detect's rule: no two classes the model reads the same way
    except PromptError as e:
        raise LabelError(f"--classes: {e}") from None
    return names


def find_images(root: Path, exclude: Path | None = None) -> list[str]:
    """Image files under ``root`` (by suffix), as sorted paths relative to it with "/".

    Hidden files and folders are left out, and so is everything of the output folder ``exclude``
    (see ``output_parts``): a folder or a link that resolves into it is never read as input.
    """
    if not root.is_dir():
        raise LabelError(f"not a folder: {root}")
    skip = output_parts(root, exclude) if exclude is not None else ()

    def skipped(path: Path) -> bool:
        return any(real == part or real.is_relative_to(part) for real in _link_hops(path) for part in skip)

    found = []
    for folder, dirs, files in os.walk(root):  # links to folders are not followed
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not skipped(here / d) and not is_label_output(here / d)
        )
        found += [
            (here / f).relative_to(root).as_posix()
            for f in files
            if Path(f).suffix.lower() in IMAGE_SUFFIXES
            and not f.startswith(".")
            and not (os.path.islink(here / f) and skipped(here / f))
        ]
    return sorted(found)


def is_label_output(folder: Path) -> bool:
    """Whether ``folder`` is the OUT of a gdino label run (its journal or manifest is there): the
    image search leaves it out, since its exports hold links to images labelled already."""
    return (folder / JOURNAL).is_file() or (folder / MANIFEST).is_file()


def claim_outputs(out: Path, targets: Sequence[Path], overwrite: bool = False) -> None:
    """Adds ``targets`` to OUT's manifest of files gdino label wrote, after refusing any of them
    that is already there and that no gdino label run wrote (unless ``overwrite``).

    An OUT that holds a journal but no manifest is a run of an earlier gdino, whose exports are
    taken as its own. Called before any detection, so a refused run has changed nothing.

    Raises:
        LabelError: a file in the way, without ``overwrite``.
    """
    manifest = out / MANIFEST
    names = [t.relative_to(out).as_posix() for t in targets]
    if manifest.is_file():
        known = set(manifest.read_text(encoding="utf-8").splitlines())
    else:
        known = set(names) if (out / JOURNAL).is_file() else set()
    foreign = [n for n, t in zip(names, targets) if n not in known and (t.exists() or t.is_symlink())]
    if foreign and not overwrite:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise LabelError(
            f"{out / foreign[0]}{more} is already there and no gdino label run wrote it; give --overwrite "
            "to replace it, or another --out"
        )
    write_atomic(manifest, "".join(f"{n}\n" for n in sorted(known | set(names))))


def _link_hops(path: Path) -> list[Path]:
    """Where ``path`` leads, resolved: each link of a chain of links, and the file at its end."""
    hops: list[Path] = []
    seen: set[Path] = set()
    while path.is_symlink() and path not in seen and len(seen) < 40:
        seen.add(path)
        path = path.parent / os.readlink(path)
        hops.append(path.parent.resolve() / path.name)
    return [*hops, path.resolve()]


def output_parts(root: Path, out: Path) -> tuple[Path, ...]:
    """The resolved folders of ``out`` that must not be read as input when labelling ``root``.

    All of ``out``, unless ``out`` holds ``root``: then the folders the exports write image links
    and label files into (``images``, ``labels``, ``Annotations``).

    Raises:
        LabelError: ``out`` is ``root``, or ``root`` is inside a folder the exports write.
    """
    real_root, real_out = root.resolve(), out.resolve()
    if real_out == real_root:
        raise LabelError(
            f"the output folder {out} is the images' folder: the next run would read its "
            f"exports as images; use another folder, e.g. {root / 'labels'}"
        )
    if not real_root.is_relative_to(real_out):
        return (real_out,)
    parts = tuple(real_out / name for name in EXPORT_FOLDERS)
    for part in parts:
        if real_root == part or real_root.is_relative_to(part):
            raise LabelError(
                f"the images' folder {root} is inside {out / part.name}, which the exports "
                "write; use another output folder"
            )
    return parts


# --------------------------------------------------------------------------- journal


class Journal:
    """Append-only JSON lines: a header with the settings, then one record per image (or error).

    Opening it drops a last line cut off by a kill, and refuses a journal written with other settings.
    """

    def __init__(self, path: Path, settings: Settings) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        self.errors: dict[str, str] = {}
        header = {"gdino_label": 1, **asdict(settings), "classes": list(settings.classes)}
        if header["masks"] is None:  # a run without masks keeps the header earlier gdinos wrote
            del header["masks"]
        if header["tiles"] is None:  # so does a run without tiles
            del header["tiles"]
        self._file = open(path, "a+b")  # noqa: SIM115 (closed in close())
        try:
            _lock(self._file, path)
            self._file.seek(0)
            good = self._load(self._file.read(), header)
            self._file.truncate(good)
            if good == 0:
                self._write([header])
        except BaseException:
            self._file.close()
            raise

    def _load(self, raw: bytes, header: dict[str, Any]) -> int:
        """Loads the records; returns the length of the whole lines that parse."""
        good = 0
        lines = raw.splitlines(keepends=True)
        for line in lines:
            if not line.endswith(b"\n"):
                break
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                break
            if good == 0:
                if item != header and not any(b'"detections"' in rest for rest in lines[1:]):
                    return 0  # a run that detected nothing (e.g. a wrong --model): start over
                if item != header:
                    raise LabelError(
                        f"{self.path.parent} holds a labelling run with other settings "
                        f"({_differences(item, header)}); use another --out, or delete {self.path} "
                        "to start over"
                    )
            elif "error" in item:
                self.errors[item["image"]] = item["error"]
                self.records.pop(item["image"], None)
            else:
                self.records[item["image"]] = item
                self.errors.pop(item["image"], None)
            good += len(line)
        return good

    def add(self, records: Sequence[Record]) -> None:
        for record in records:
            if "error" in record:
                self.errors[record["image"]] = record["error"]
            else:
                self.records[record["image"]] = record
                self.errors.pop(record["image"], None)
        self._write(records)

    def _write(self, items: Sequence[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(item) + "\n" for item in items).encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {str(old.get(k))[:60]} -> {str(new.get(k))[:60]}" for k in keys) or "unknown header"


def _lock(f: IO[bytes], path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per OUT is up to the user
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise LabelError(f"another gdino label run is writing {path.parent}") from None


# --------------------------------------------------------------------------- the run


def read_entry(root: Path, name: str) -> tuple[str, Image.Image | None, str | None]:
    try:
        return name, load_image(root / name), None
    except ImageError as e:
        return name, None, str(e)
    except Exception as e:  # noqa: BLE001 (whatever a broken file raises, the run goes on)
        return name, None, f"cannot read the image: {type(e).__name__}: {e}"


def _batches(root: Path, names: Sequence[str], size: int) -> Iterator[list[tuple[str, Image.Image | None, str | None]]]:
    """Loaded images in batches, the next batch read in threads while the caller works on this one."""
    batch = []
    for item in read_ahead(lambda name: read_entry(root, name), names, ahead=size):
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def detect_batch(detect: Detect, loaded: list[tuple[str, Image.Image]]) -> list[Record]:
    """Records for a batch of loaded images; if the batch fails, image by image, errors recorded."""
    try:
        found = detect([image for _, image in loaded])
    except Exception:  # noqa: BLE001 (one bad image must not lose the batch: retry one by one)
        if len(loaded) == 1:
            name, _ = loaded[0]
            return [{"image": name, "error": f"detection failed: {sys.exc_info()[1]!r}"}]
        return [r for item in loaded for r in detect_batch(detect, [item])]
    return [
        {"image": name, "width": image.width, "height": image.height, "detections": det.to_list()}
        for (name, image), det in zip(loaded, found)
    ]


def label_folder(
    root: Path,
    out: Path,
    fmt: str,
    settings: Settings,
    make_detector: Callable[[], Detect],
    batch_size: int = 4,
    log: IO[str] | None = None,
    runner: Runner | None = None,
    overwrite: bool = False,
    mask_format: str = "polygon",
) -> Summary:
    """Detects ``settings.classes`` in every image under ``root`` and exports them to ``out``.

    Args:
        root: the folder of images.
        out: the output folder (journal, export, errors.txt).
        fmt: one of ``gdino.apps.exports.FORMATS``.
        settings: classes, model and thresholds (a journal is resumed only with the same ones).
        make_detector: builds the detect function (images -> Detections); called only once an
            image that is not in the journal yet has been read.
        batch_size: images per call of the detect function.
        log: where progress and warnings go (stderr when None).
        runner: runs the detector over the images not in the journal yet, adding their records
            to the journal (``gdino.apps.label_ray`` runs them on Ray); this process, batch by batch,
            when None.
        overwrite: replace files in ``out`` that the export writes although no gdino label run
            wrote them (without it they are refused before any work: ``claim_outputs``).
        mask_format: with ``settings.masks``, how the COCO export writes them: "polygon" or "rle".
    """
    log = log if log is not None else sys.stderr
    _check(fmt, settings)
    names = find_images(root, exclude=out)
    if not names:
        raise LabelError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        out.mkdir(parents=True, exist_ok=True)
        targets = export_targets(names, fmt, out, masks=settings.masks is not None)
        claim_outputs(out, [*targets, out / ERRORS], overwrite)
        journal = Journal(out / JOURNAL, settings)
    except OSError as e:
        raise LabelError(f"cannot write in the output folder {out}: {e.strerror or e}") from None
    try:
        todo = [n for n in names if n not in journal.records]
        resumed = len(names) - len(todo)
        if resumed:
            print(f"label: resuming, {resumed} of {len(names)} images already done", file=log, flush=True)
        if todo:
            run = runner if runner is not None else local_runner(make_detector, batch_size)
            with Progress(len(todo), "label", stream=log) as progress:
                run(root, todo, journal, progress)
        records = [journal.records[n] for n in names if n in journal.records]
        errors = [(n, journal.errors[n]) for n in names if n in journal.errors]
    finally:
        journal.close()
    masks = settings.masks is not None
    files = export(records, settings.classes, fmt, out, root, _warner(log), mask_format, masks)
    write_atomic(out / ERRORS, "".join(f"{n}\t{' '.join(reason.split())}\n" for n, reason in errors))
    boxes = sum(len(r["detections"]) for r in records)
    return Summary(len(names), resumed, len(errors), boxes, tuple(files))


def _warner(log: IO[str]) -> Callable[[str], None]:
    return lambda message: print(f"label: warning: {message}", file=log)


def _check(fmt: str, settings: Settings) -> None:
    """Refuses (``LabelError``) an unknown format and class names that a line-based export cannot hold."""
    if fmt not in FORMATS:
        raise LabelError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    for name in settings.classes:
        if "\n" in name or "\r" in name:
            raise LabelError(f"class {name!r} has a line break")


# What runs the detector over a run's images: (root, names not in the journal, journal, progress).
Runner = Callable[[Path, list[str], Journal, Progress], None]


def local_runner(make_detector: Callable[[], Detect], batch_size: int) -> Runner:
    """The single-process run: batches read ahead in threads, each journaled before the next."""

    def run(root: Path, names: list[str], journal: Journal, progress: Progress) -> None:
        detect = None  # the model is loaded once an image needs it (not for retrying broken files)
        for batch in _batches(root, names, max(1, batch_size)):
            failed: list[Record] = [{"image": n, "error": err} for n, _, err in batch if err is not None]
            loaded = [(n, img) for n, img, err in batch if img is not None]
            if loaded and detect is None:
                detect = make_detector()
            records = detect_batch(detect, loaded) if detect is not None and loaded else []
            journal.add(records + failed)
            progress.update(len(batch))

    return run
