"""The forgetting benchmark's data: new concepts ``gdino-shapes`` never saw, in a user-like data set.

    from gdino.training.forgetting_data import write_forgetting_dataset
    files = write_forgetting_dataset("out-forget/data", seed=1)

A user who fine-tunes has a few hundred images of *their* classes, annotated with only those. Here
the user's classes are the new concepts: a new colour on the old shapes ("pink circle", ...) and a
new shape in every colour ("red hexagon", ..., "pink hexagon"), 11 pairs. Their images also hold
old objects ("blue square", ...) that nobody annotated, as a user's images hold things outside
their label list; so a plain fine-tune is taught that those are background, the way forgetting
happens in practice.

The splits, all under one folder:

* ``train``: the user's data set: every image has at least one new-concept object, the others are
  drawn from the new pairs and the old *seen* pairs; only the new concepts are annotated and listed.
* ``new``: never-seen images of the same kind with **every** object annotated and every pair (old
  and new) listed, so AP50 on the new pairs is measured with the old names in the prompt too.
* ``val``, ``held_out``: the shapes data set's splits (:func:`gdino.training.shapes.write_split`) of
  another seed than ``gdino-shapes`` trained on: AP50 on the old seen pairs and on the old pairs held
  out of its training ("green triangle", ...), the two things a fine-tune must keep.

Category ids: the old pairs keep theirs (1-24, :func:`gdino.training.shapes.pair_names`); the new
pairs follow (25-35, :func:`new_pair_names`). The held-out pairs never appear in ``train``, so the
held-out figure still measures grounding of words, not memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gdino.training.shapes import (
    COLOURS,
    HELD_OUT,
    NEW_COLOURS,
    NEW_SHAPES,
    SHAPES,
    ShapesSettings,
    find_photos,
    load_photos,
    pair_names,
    render,
    write_scenes,
    write_split,
)

# Split ids for the seeds of the new splits (the shapes splits use 0-2).
FORGETTING_SPLITS: dict[str, int] = {"train": 10, "new": 11}
DEFAULT_COUNTS: dict[str, int] = {"train": 300, "new": 100, "val": 100, "held_out": 100}


def new_pair_names() -> list[str]:
    """The new concepts: the new colours on the old shapes, then the new shapes in every colour."""
    colours = list(COLOURS) + list(NEW_COLOURS)
    return [f"{c} {s}" for c in NEW_COLOURS for s in SHAPES] + [f"{c} {s}" for s in NEW_SHAPES for c in colours]


def all_pair_names() -> list[str]:
    """Old pairs then new ones; a pair's category id is its index + 1 in every split."""
    return pair_names() + new_pair_names()


def seen_pairs(held_out: Sequence[str] = HELD_OUT) -> list[str]:
    """The old pairs ``gdino-shapes`` was trained on: the base model's classes."""
    return [p for p in pair_names() if p not in held_out]


def write_forgetting_dataset(
    out: str | Path,
    counts: dict[str, int] | None = None,
    seed: int = 1,
    settings: ShapesSettings | None = None,
    image_format: str = "jpg",
) -> dict[str, Path]:
    """Writes the benchmark's splits (``train``, ``new``, ``val``, ``held_out``) under ``out``.

    Args:
        out: the folder.
        counts: images per split (default 300 / 100 / 100 / 100); a split left out is not written.
        seed: fixes every image (``gdino-shapes`` was trained and validated on seed 0).
        settings: what the images look like (the shapes defaults).
        image_format: ``"jpg"`` or ``"png"``.

    Returns:
        Each split's COCO file.
    """
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    unknown = set(counts) - set(DEFAULT_COUNTS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {', '.join(DEFAULT_COUNTS)}")
    settings = settings if settings is not None else ShapesSettings()
    photos = load_photos(find_photos())
    root = Path(out)
    written: dict[str, Path] = {}
    for split in ("train", "new"):
        if counts.get(split):
            written[split] = _write_new_split(root, split, counts[split], seed, settings, photos, image_format)
    for split in ("val", "held_out"):
        if counts.get(split):
            written[split] = write_split(root, split, counts[split], seed, settings, photos, image_format)
    return written


def _write_new_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    settings: ShapesSettings,
    photos: Sequence[np.ndarray],
    image_format: str,
) -> Path:
    names = all_pair_names()
    new = [names.index(p) for p in new_pair_names()]
    old_seen = [names.index(p) for p in seen_pairs(settings.held_out)]
    scenes = (
        render(np.random.default_rng([seed, FORGETTING_SPLITS[split], i]), new + old_seen, settings, photos, new, names)
        for i in range(count)
    )
    info = {
        "description": f"gdino forgetting benchmark, split {split}",
        "seed": seed,
        "held_out": list(settings.held_out),
        "new_pairs": new_pair_names(),
    }
    if split == "train":  # the user's data set: only their classes annotated and listed
        return write_scenes(out, split, scenes, names, new, info, annotated=set(new), image_format=image_format)
    return write_scenes(out, split, scenes, names, list(range(len(names))), info, image_format=image_format)
