"""From a data set to model inputs: seeded examples (numpy, no torch) and a collate to tensors.

``examples(dataset, captions, augment, seed, epoch)`` yields :class:`Example`: the image after
augmentation, its boxes, and its caption (``box_labels`` align with ``boxes``). The order of an
epoch and each image's randomness depend only on ``(seed, epoch, index)``, so a run restarted at
position ``start`` of an epoch sees exactly what an uninterrupted one would, in any worker.
``collate(examples, processor)`` gives what the model takes::

    inputs, labels = collate(batch, processor)
    outputs = model(**inputs, labels=labels)

``inputs`` is the processor's ``BatchEncoding`` (pixel_values, pixel_mask, input_ids,
attention_mask, token_type_ids); ``labels`` holds per image ``class_labels`` (N,) int64 (the
index of each box's phrase in its caption), ``boxes`` (N, 4) float32 ``cx, cy, w, h`` normalised
to the image, and ``positive_map`` (P, max_text_len) float32 (1 on phrase p's tokens), which
also serves grounding captions, whose phrases are not the spans between "." tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from gdino.processing.image import ImageError, pad_batch, preprocess_image
from gdino.processing.processor import BatchEncoding, GroundingDinoProcessor
from gdino.training.augment import Augment
from gdino.training.captions import Caption, CaptionBuilder
from gdino.training.samples import Dataset, Problem, read_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One augmented training image.

    Attributes:
        image: (H, W, 3) uint8.
        boxes: (N, 4) float32 ``x0, y0, x1, y1`` pixels of ``image``.
        caption: its prompt; ``caption.box_labels[i]`` is box i's phrase.
        index: the sample's index in the data set.
    """

    image: np.ndarray
    boxes: np.ndarray
    caption: Caption
    index: int


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order of the samples in an epoch: a permutation fixed by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def make_example(
    dataset: Dataset, index: int, captions: CaptionBuilder, augment: Augment | None, seed: int, epoch: int
) -> Example:
    """Sample ``index`` read, augmented and captioned with randomness fixed by ``(seed, epoch, index)``.

    Raises:
        ImageError: its image cannot be read.
    """
    sample = dataset[index]
    rng = np.random.default_rng([seed, epoch, index, 1])
    image, boxes, keep = read_image(sample), sample.boxes, np.arange(len(sample.boxes))
    if augment is not None:
        image, boxes, keep = augment(image, boxes, rng)
    labels = tuple(sample.labels[k] for k in keep)
    caption = captions(replace(sample, boxes=boxes, labels=labels), rng)
    return Example(image, boxes[list(caption.kept)], caption, index)


def examples(
    dataset: Dataset,
    captions: CaptionBuilder,
    augment: Augment | None = None,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    shuffle: bool = True,
    on_problem: Callable[[Problem], None] | None = None,
) -> Iterator[Example]:
    """The examples of one epoch, from position ``start`` of its order.

    An image that cannot be read is reported (``on_problem``, else a logged warning) and skipped.
    """
    for index in epoch_order(len(dataset), seed, epoch, shuffle)[start:].tolist():
        try:
            yield make_example(dataset, index, captions, augment, seed, epoch)
        except ImageError as e:
            problem = Problem(str(dataset[index].image), dataset[index].origin or "image", f"skipped: {e}")
            if on_problem is not None:
                on_problem(problem)
            else:
                logger.warning("%s", problem)


def batches(items: Iterator[Example], size: int) -> Iterator[list[Example]]:
    """Groups examples into lists of ``size`` (the last may be shorter)."""
    batch: list[Example] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def collate(
    batch: Sequence[Example], processor: GroundingDinoProcessor, resize: bool = False
) -> tuple[BatchEncoding, list[dict[str, torch.Tensor]]]:
    """Model inputs and targets of a batch.

    Args:
        batch: the examples.
        processor: gives the tokenizer, the normalisation and (with ``resize``) the image size.
        resize: resize images to the processor's size; ``False`` for augmented images, which the
            augmentation has already sized.
    """
    settings = replace(processor.image_settings, do_resize=resize)
    pixel_values, pixel_mask = pad_batch([preprocess_image(Image.fromarray(ex.image), settings) for ex in batch])
    tokens = processor.tokenizer.encode([ex.caption.text for ex in batch])
    inputs = BatchEncoding(
        input_ids=tokens.input_ids,
        token_type_ids=tokens.token_type_ids,
        attention_mask=tokens.attention_mask,
        pixel_mask=torch.from_numpy(pixel_mask),
        pixel_values=torch.from_numpy(pixel_values),
    )
    length = processor.tokenizer.max_text_len
    return inputs, [_target(ex, length) for ex in batch]


def _target(example: Example, length: int) -> dict[str, Any]:
    height, width = example.image.shape[:2]
    x0, y0, x1, y1 = np.asarray(example.boxes, dtype=np.float32).reshape(-1, 4).T
    boxes = np.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], -1)
    return {
        "class_labels": torch.tensor(example.caption.box_labels, dtype=torch.long),
        "boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
        "positive_map": torch.from_numpy(example.caption.positive_map(length)),
    }
