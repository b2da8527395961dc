"""``detect(image, prompt, tiles=...)``: tiles batched through the model, merged as SAHI merges
(``gdino.inference.tiled``), on the small seeded model at 160-pixel inputs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.tiled import tile_count
from gdino.inference.tiles import TileSettings, merge_tiles, tile_grid, to_image

PROMPT = "a cat. a remote control."
LABELS = [f"thing {i}" for i in range(120)]  # more than one chunk of the small model's text length


@pytest.fixture(scope="module")
def picture(data_dir) -> Image.Image:
    """A 400x300 photo: 3 x 3 tiles of 160 pixels at overlap 0.2 (and the whole image)."""
    return Image.open(data_dir / "chelsea.png").convert("RGB").resize((400, 300))


def per_tile(model, picture: Image.Image, settings: TileSettings, text, **kwargs) -> Detections:
    """The reference: ``detect`` on each tile crop (and the whole image), merged."""
    tiles = tile_grid(picture.width, picture.height, settings)
    found = [model.detect(picture.crop(t), text, **kwargs) for t in tiles]
    full = model.detect(picture, text, **kwargs) if settings.full_image else None
    if full is not None:  # clipped to the image, as the tiles' boxes are
        full = to_image(full, (0, 0, *picture.size), picture.size)
    return merge_tiles(found, tiles, picture.size, settings, full)


def assert_same(a: Detections, b: Detections) -> None:
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.label_ids, b.label_ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.boxes, b.boxes)


def _batch(first: object) -> int:
    """The batch size of a module's first argument: a tensor, or image features (their first map)."""
    return len(first.maps[0]) if hasattr(first, "maps") else len(first)  # type: ignore[arg-type]


@contextmanager
def counted(model) -> Iterator[dict[str, list[int]]]:
    """The batch size of every call of Swin, BERT and the transformer (encoder and decoder)."""
    calls: dict[str, list[int]] = {"swin": [], "bert": [], "transformer": []}
    hooks = [
        getattr(model, part).register_forward_hook(lambda _m, args, _o, key=key: calls[key].append(_batch(args[0])))
        for part, key in (("backbone", "swin"), ("bert", "bert"), ("transformer", "transformer"))
    ]
    try:
        yield calls
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("full_image", [True, False])
def test_tiles_one_at_a_time_equal_per_tile_detection_merged(fast_model, picture, full_image: bool) -> None:
    settings = TileSettings(160, 0.2, full_image=full_image)
    kwargs = {"box_threshold": 0.2, "text_threshold": 0.1}
    found = fast_model.detect(picture, PROMPT, tiles=settings, **kwargs)
    assert isinstance(found, Detections) and found.image_size == (400, 300) and len(found) > 0
    assert_same(found, per_tile(fast_model, picture, settings, PROMPT, **kwargs))


def test_label_list_chunks_reuse_each_tile(fast_model, picture) -> None:
    settings = TileSettings(200, 0.0)
    query = fast_model._queries(LABELS, 1, None)[0]
    chunks = len(query.prompts)
    assert chunks >= 2
    with counted(fast_model) as calls:
        found = fast_model.detect(picture, LABELS, tiles=settings, batch_size=4, box_threshold=0.15)
    tiles = len(tile_grid(400, 300, settings))  # 2 x 2, plus the whole image
    assert calls["swin"] == [4, 1]  # each tile through Swin once, in one batch
    assert calls["transformer"] == [4] * chunks + [1] * chunks  # every chunk on the same features
    assert len(calls["bert"]) <= chunks  # each chunk's prompt encoded once (cached across calls)
    assert tile_count([(400, 300)], settings) == tiles + 1
    reference = fast_model.detect(picture, LABELS, tiles=settings, batch_size=1, box_threshold=0.15)
    assert_close(found, reference)


def assert_close(a: Detections, b: Detections) -> None:
    """Batched against one-at-a-time: equal up to the rounding of batched matrix products."""
    assert abs(len(a) - len(b)) <= 1
    for box, label in zip(a.boxes, a.labels):
        same = [i for i, other in enumerate(b.labels) if other == label]
        assert same and np.abs(b.boxes[same] - box).max(axis=1).min() < 0.05
    np.testing.assert_allclose(np.sort(a.scores)[-3:], np.sort(b.scores)[-3:], atol=1e-4)


def test_t_tiles_cost_t_single_passes_in_batches(fast_model, picture) -> None:
    settings = TileSettings(160, 0.2)
    n_tiles = len(tile_grid(400, 300, settings))
    assert n_tiles == 9
    with counted(fast_model) as calls:
        batched = fast_model.detect(picture, PROMPT, tiles=settings, batch_size=4, box_threshold=0.2)
    assert calls["swin"] == [4, 4, 1, 1]  # 9 tiles in batches of 4, then the whole image
    assert calls["transformer"] == [4, 4, 1, 1]
    assert len(calls["bert"]) <= 1  # the prompt once (none when a test before encoded it)
    with counted(fast_model) as calls:
        fast_model.detect([picture, picture], PROMPT, tiles=settings, batch_size=5, box_threshold=0.2)
    assert calls["swin"] == [5, 5, 5, 3, 2]  # both images' 18 tiles share batches; the two whole images too
    assert calls["bert"] == []
    assert_close(batched, fast_model.detect(picture, PROMPT, tiles=settings, box_threshold=0.2))


def test_several_images_and_prompts(fast_model, picture) -> None:
    settings = TileSettings(160, 0.2, merge="nms")
    small = picture.resize((300, 200))
    found = fast_model.detect(
        [picture, small], prompts=[PROMPT, ["cat", "sofa"]], tiles=settings, batch_size=3, box_threshold=0.2
    )
    assert isinstance(found, list) and [f.image_size for f in found] == [(400, 300), (300, 200)]
    assert set(found[1].labels) <= {"cat", "sofa"}
    assert_close(found[1], per_tile(fast_model, small, settings, ["cat", "sofa"], box_threshold=0.2))


def test_bad_tiles_are_refused_before_any_work(fast_model, picture) -> None:
    with counted(fast_model) as calls:
        with pytest.raises(ValueError, match="tile size 500 is over the 400x300 image"):
            fast_model.detect(picture, PROMPT, tiles=TileSettings(500))
        with pytest.raises(ValueError, match="batch_size must be"):
            fast_model.detect(picture, PROMPT, tiles=TileSettings(160), batch_size=0)
        with pytest.raises(ValueError, match="not encode_image"):
            fast_model.detect(fast_model.encode_image(picture), PROMPT, tiles=TileSettings(160))
    assert calls["transformer"] == []
    with pytest.raises(ValueError, match="overlap must be in"):
        TileSettings(160, 0.9)
    with pytest.raises(ValueError, match="at least 32"):
        TileSettings(16)


def test_images_of_one_size_batched_without_tiles(fast_model, picture) -> None:
    """``batch_size`` without tiles: images of one size (SAHI's slices) through the whole model together."""
    slices = [picture.crop((x, 0, x + 200, 200)) for x in (0, 100, 200)] + [picture.resize((300, 200))]
    with counted(fast_model) as calls:
        batched = fast_model.detect(slices, PROMPT, box_threshold=0.2, batch_size=4)
    assert calls["swin"] == [3, 1] and calls["transformer"] == [3, 1]  # grouped by size
    assert isinstance(batched, list) and [f.image_size for f in batched] == [(200, 200)] * 3 + [(300, 200)]
    for one, alone in zip(batched, fast_model.detect(slices, PROMPT, box_threshold=0.2)):
        assert_close(one, alone)
    labels = fast_model.detect(slices[:2], ["cat", "sofa"], box_threshold=0.2, batch_size=2)
    for one, alone in zip(labels, fast_model.detect(slices[:2], ["cat", "sofa"], box_threshold=0.2)):
        assert_close(one, alone)
    with pytest.raises(ValueError, match="batch_size must be"):
        fast_model.detect(slices, PROMPT, batch_size=0)
