"""Tiled detection's numpy core (``gdino.inference.tiles``): the grid of tiles, tiles' boxes mapped onto
the image, and the merge of the boxes one object leaves in several tiles, checked against SAHI itself
(``sahi``, a test-only reference: ``GreedyNMMPostprocess``, ``NMSPostprocess``, ``get_slice_bboxes``)
on the same predictions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gdino.inference.detections import Detections
from gdino.inference.postprocess import box_ios
from gdino.inference.tiles import (
    MIN_TILE_SIZE,
    Tile,
    TileSettings,
    concatenate,
    merge_detections,
    merge_tiles,
    needs_full_pass,
    tile_grid,
    to_image,
)

LABELS = ("car", "person", "boat")
Row = tuple[tuple[float, ...], float, int, str]  # a merged box, its score, label id and label


def detections(boxes: object, scores: object, ids: object, size: tuple[int, int]) -> Detections:
    """``Detections`` of (N, 4) xyxy boxes, labelled from ``LABELS``."""
    ids = np.asarray(ids, dtype=np.int64)
    return Detections(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(scores, dtype=np.float32),
        tuple(LABELS[i] for i in ids),
        ids,
        size,
    )


def rows(found: Detections) -> list[Row]:
    return [
        (tuple(float(v) for v in box), float(score), int(i), label)
        for box, score, i, label in zip(found.boxes, found.scores, found.label_ids, found.labels)
    ]


# --------------------------------------------------------------------------- the grid

GRIDS = [  # (width, height, size, overlap)
    (1000, 700, 256, 0.2),
    (640, 480, 200, 0.33),
    (513, 257, 64, 0.5),
    (300, 900, 128, 0.0),
    (100, 2000, 512, 0.1),
    (257, 129, 32, 0.89),
]


@pytest.mark.parametrize(("width", "height", "size", "overlap"), GRIDS)
def test_grid_covers_every_pixel_with_the_overlap(width: int, height: int, size: int, overlap: float) -> None:
    tiles = tile_grid(width, height, TileSettings(size, overlap))
    grid = np.array(tiles)  # (K, 4)
    tile_w, tile_h = min(size, width), min(size, height)
    assert (grid[:, 2] - grid[:, 0] == tile_w).all() and (grid[:, 3] - grid[:, 1] == tile_h).all()
    assert (grid[:, :2] >= 0).all() and (grid[:, 2] <= width).all() and (grid[:, 3] <= height).all()
    covered = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs, ys = sorted(set(grid[:, 0].tolist())), sorted(set(grid[:, 1].tolist()))
    assert tiles == [(x, y, x + tile_w, y + tile_h) for y in ys for x in xs]  # row-major, a full grid
    for starts, side, length in ((xs, tile_w, width), (ys, tile_h, height)):
        assert starts[0] == 0 and starts[-1] + side == length  # the last column and row end on the border
        shared = side - np.diff(starts)  # what neighbours share
        assert (shared >= overlap * size - 1e-9).all() and (shared < side).all()


def test_exact_tiles() -> None:
    assert tile_grid(200, 100, TileSettings(100, 0.2)) == [(0, 0, 100, 100), (80, 0, 180, 100), (100, 0, 200, 100)]
    assert tile_grid(512, 512, TileSettings(256, 0.0)) == [
        (0, 0, 256, 256),
        (256, 0, 512, 256),
        (0, 256, 256, 512),
        (256, 256, 512, 512),
    ]
    assert tile_grid(1024, 768, TileSettings(512, 0.25)) == [
        (0, 0, 512, 512),
        (384, 0, 896, 512),
        (512, 0, 1024, 512),
        (0, 256, 512, 768),
        (384, 256, 896, 768),
        (512, 256, 1024, 768),
    ]
    assert tile_grid(180, 100, TileSettings(100, 0.2)) == [(0, 0, 100, 100), (80, 0, 180, 100)]  # ends on the border


def test_an_image_smaller_than_a_tile_is_one_tile() -> None:
    assert tile_grid(20, 10, TileSettings(MIN_TILE_SIZE)) == [(0, 0, 20, 10)]
    assert tile_grid(512, 512, TileSettings(512)) == [(0, 0, 512, 512)]
    assert tile_grid(1, 1, TileSettings(640, 0.5)) == [(0, 0, 1, 1)]
    assert tile_grid(300, 40, TileSettings(128, 0.5)) == [
        (0, 0, 128, 40),
        (64, 0, 192, 40),
        (128, 0, 256, 40),
        (172, 0, 300, 40),
    ]


def test_overlap_pixels_round_up() -> None:
    assert TileSettings(100, 0.07).overlap_pixels == 7  # 0.07 * 100 is 7.000000000000001
    assert TileSettings(100, 0.29).overlap_pixels == 29  # 0.29 * 100 is 28.999999999999996
    assert TileSettings(64, 0.2).overlap_pixels == 13  # 12.8: at least the overlap asked
    assert TileSettings(64, 0.0).overlap_pixels == 0


@pytest.mark.parametrize(("width", "height", "size", "overlap"), [(1000, 700, 256, 0.25), (640, 480, 200, 0.2)])
def test_grid_is_sahis_where_the_overlap_is_whole(width: int, height: int, size: int, overlap: float) -> None:
    slicing = pytest.importorskip("sahi.slicing")
    theirs = slicing.get_slice_bboxes(height, width, size, size, False, overlap, overlap)
    assert tile_grid(width, height, TileSettings(size, overlap)) == [tuple(t) for t in theirs]


def test_full_pass_only_for_more_than_one_tile() -> None:
    settings = TileSettings(128)
    assert needs_full_pass(tile_grid(400, 300, settings), settings)
    assert not needs_full_pass(tile_grid(100, 120, settings), settings)
    assert not needs_full_pass(tile_grid(400, 300, settings), TileSettings(128, full_image=False))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"size": MIN_TILE_SIZE - 1}, "size"),
        ({"size": 256.0}, "size"),
        ({"size": True}, "size"),
        ({"size": 256, "overlap": -0.1}, "overlap"),
        ({"size": 256, "overlap": 0.9}, "overlap"),
        ({"size": 256, "overlap": float("nan")}, "overlap"),
        ({"size": 256, "overlap": "0.2"}, "overlap"),
        ({"size": 256, "full_image": 1}, "full_image"),
        ({"size": 256, "merge": "nmm"}, "merge"),
        ({"size": 256, "match_threshold": 0}, "match_threshold"),
        ({"size": 256, "match_threshold": 1.5}, "match_threshold"),
        ({"size": 256, "match_metric": "giou"}, "match_metric"),
        ({"size": 256, "merge": "nms", "match_metric": "ios"}, "match_metric"),
    ],
)
def test_bad_settings_are_refused(settings: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TileSettings(**settings)


def test_settings_defaults() -> None:
    assert TileSettings(512).match_metric == "ios"
    assert TileSettings(512, merge="nms").match_metric == "iou"
    assert TileSettings(512, match_metric="iou").match_metric == "iou"
    assert TileSettings(np.int64(512), np.float32(0.25)) == TileSettings(512, 0.25)


@pytest.mark.parametrize(
    ("width", "height", "field"), [(0, 10, "width"), (10, -1, "height"), (10.5, 10, "width"), (True, 10, "width")]
)
def test_bad_image_sizes_are_refused(width: object, height: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tile_grid(width, height, TileSettings(64))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- tiles -> image


def test_tile_boxes_are_shifted_onto_the_image_and_clipped() -> None:
    tile = (100, 50, 356, 306)
    local = detections([[10, 20, 30, 40], [-5, -5, 300, 300]], [0.9, 0.5], [1, 0], (256, 256))
    found = to_image(local, tile, (300, 280))
    np.testing.assert_array_equal(found.boxes, [[110, 70, 130, 90], [95, 45, 300, 280]])
    assert found.labels == ("person", "car") and found.image_size == (300, 280)
    np.testing.assert_array_equal(found.scores, local.scores)
    with pytest.raises(ValueError, match="tile"):
        to_image(local, (0, 0, 128, 256), (300, 280))


def test_merge_tiles_refuses_mismatched_inputs() -> None:
    settings = TileSettings(128)
    tiles = tile_grid(300, 200, settings)
    empty = [detections([], [], [], (128, 128)) for _ in tiles]
    assert len(merge_tiles(empty, tiles, (300, 200), settings)) == 0
    with pytest.raises(ValueError, match="tiles"):
        merge_tiles(empty[1:], tiles, (300, 200), settings)
    with pytest.raises(ValueError, match="full-image"):
        merge_tiles(empty, tiles, (300, 200), settings, detections([], [], [], (128, 128)))


def test_tile_boxes_are_sahis_shifted_predictions(sahi: SimpleNamespace) -> None:
    tile = (96, 172, 224, 300)
    local = detections([[0, 0, 128, 128], [10.25, 3.5, 20.75, 127.0]], [0.5, 0.6], [0, 2], (128, 128))
    ours = to_image(local, tile, (400, 300))
    for box, mapped in zip(local.boxes, ours.boxes):
        shifted = sahi.ObjectPrediction([float(v) for v in box], 0, None, None, 0.5, [96, 172], [300, 400])
        assert shifted.get_shifted_object_prediction().bbox.to_xyxy() == mapped.tolist()


# --------------------------------------------------------------------------- the merge, against SAHI


@pytest.fixture(scope="module")
def sahi() -> SimpleNamespace:
    pytest.importorskip("sahi")
    from sahi.postprocess.combine import GreedyNMMPostprocess, NMSPostprocess
    from sahi.prediction import ObjectPrediction

    return SimpleNamespace(
        ObjectPrediction=ObjectPrediction, merges={"greedynmm": GreedyNMMPostprocess, "nms": NMSPostprocess}
    )


def sahi_merge(sahi: SimpleNamespace, found: Detections, settings: TileSettings) -> list[Row]:
    """SAHI's merge of ``found`` (per category), its kept boxes sorted best first (a stable sort)."""
    predictions = [
        sahi.ObjectPrediction(bbox=list(box), category_id=i, category_name=label, score=score)
        for box, score, i, label in rows(found)
    ]
    merge = sahi.merges[settings.merge](
        match_threshold=settings.match_threshold, match_metric=settings.match_metric.upper(), class_agnostic=False
    )
    kept = [(tuple(p.bbox.to_xyxy()), p.score.value, p.category.id, p.category.name) for p in merge(predictions)]
    return sorted(kept, key=lambda row: -row[1])


def assert_same(ours: Detections, theirs: list[Row]) -> None:
    """The same boxes (to float precision), scores, labels, in the same order."""
    assert [(score, i, label) for _, score, i, label in rows(ours)] == [row[1:] for row in theirs]
    np.testing.assert_allclose(ours.boxes, np.array([row[0] for row in theirs]).reshape(-1, 4), rtol=1e-6)


MERGES = [
    TileSettings(128, 0.25, merge=merge, match_metric=metric, match_threshold=threshold)
    for merge, metric in (("greedynmm", "ios"), ("greedynmm", "iou"), ("nms", "iou"))
    for threshold in (0.1, 1 / 3, 0.5, 0.8, 1.0)
]
SETTINGS_IDS = [f"{s.merge}-{s.match_metric}-{s.match_threshold:.2f}" for s in MERGES]


def random_tiles(seed: int, size: tuple[int, int], settings: TileSettings):
    """A noisy detector on random objects of three labels: in each tile and in the whole image, each
    object's part there (when a tenth of it shows) moved by up to 3 pixels (half on whole pixels),
    scored on a 0.05 grid (so that some tie), and a few false boxes: (per tile ``Detections``, tiles,
    full pass)."""
    rng = np.random.default_rng(seed)
    width, height = size
    corner = rng.uniform(0, [width - 10, height - 10], (40, 2))
    objects = np.concatenate([corner, np.minimum(corner + rng.uniform(6, 90, (40, 2)), size)], -1)  # (40, 4)
    ids = rng.integers(0, len(LABELS), 40)

    def noisy(tile: Tile) -> Detections:
        x0, y0, x1, y1 = tile
        clean = seen_in(tile, objects, ids)
        false = rng.uniform(0, [x1 - x0 - 4, y1 - y0 - 4], (3, 2))
        boxes = np.concatenate([clean.boxes + rng.uniform(-3, 3, clean.boxes.shape), np.c_[false, false + 4]])
        boxes[::2] = np.round(boxes[::2])
        boxes = np.clip(np.sort(boxes.reshape(-1, 2, 2), 1).reshape(-1, 4), 0, [x1 - x0, y1 - y0] * 2)
        scores = np.round(rng.uniform(0.3, 1.0, len(boxes)) * 20) / 20
        return detections(boxes, scores, [*clean.label_ids, *rng.integers(0, 3, 3)], (x1 - x0, y1 - y0))

    tiles = tile_grid(width, height, settings)
    return [noisy(tile) for tile in tiles], tiles, noisy((0, 0, width, height))


def seen_in(tile: Tile, objects: np.ndarray, ids: np.ndarray) -> Detections:
    """A perfect detector on a tile: each (N, 4) object's part in the tile (when at least a tenth of it
    shows), in the tile's pixels, scored by how much of it shows (objects seen whole in two tiles tie)."""
    x0, y0, x1, y1 = tile
    part = np.concatenate([np.maximum(objects[:, :2], [x0, y0]), np.minimum(objects[:, 2:], [x1, y1])], -1)
    area = np.prod(np.clip(part[:, 2:] - part[:, :2], 0, None), -1)
    shown = area / np.prod(objects[:, 2:] - objects[:, :2], -1)
    keep = shown >= 0.1
    local = part[keep] - [x0, y0, x0, y0]
    return detections(local, np.round(0.4 + 0.5 * shown[keep], 2), ids[keep], (x1 - x0, y1 - y0))


IMAGE = (400, 300)  # (width, height); 128-pixel tiles, overlap 0.25: columns at 0 96 192 272, rows at 0 96 172
OBJECTS = np.array(
    [
        [118, 40, 138, 60],  # on the right border of the first column's tiles (x = 128)
        [108, 108, 148, 148],  # on the corner where four tiles meet
        [200, 118, 240, 138],  # on a row's bottom border (y = 128)
        [260, 10, 290, 50],  # across the last column's shifted left border (x = 272)
        [100, 200, 130, 230],  # in the overlap of two columns
        [100, 200, 130, 230],  # the same place, another label
        [20, 150, 240, 290],  # larger than a tile
        [350, 250, 358, 258],  # tiny, in the corner tile
        [300, 100, 330, 130],  # two of a label that touch: never one
        [330, 100, 360, 130],
    ],
    dtype=np.float32,
)
OBJECT_IDS = np.array([0, 1, 2, 0, 0, 1, 2, 1, 0, 0])


def crafted_tiles(settings: TileSettings) -> tuple[list[Detections], list[Tile], Detections]:
    """``OBJECTS`` as tiles see them, and the whole image seeing each at 0.6."""
    tiles = tile_grid(*IMAGE, settings)
    full = detections(OBJECTS, np.full(len(OBJECTS), 0.6), OBJECT_IDS, IMAGE)
    return [seen_in(tile, OBJECTS, OBJECT_IDS) for tile in tiles], tiles, full


@pytest.mark.parametrize("settings", MERGES, ids=SETTINGS_IDS)
def test_merge_is_sahis_on_random_boxes(sahi: SimpleNamespace, settings: TileSettings) -> None:
    for seed in (0, 1):
        per_tile, tiles, full = random_tiles(seed, (300, 250), settings)
        found = concatenate([*(to_image(d, t, (300, 250)) for d, t in zip(per_tile, tiles)), full], (300, 250))
        ours = merge_tiles(per_tile, tiles, (300, 250), settings, full)
        assert 0 < len(ours) < len(found) or settings.match_threshold == 1
        assert_same(ours, sahi_merge(sahi, found, settings))


@pytest.mark.parametrize("settings", MERGES, ids=SETTINGS_IDS)
def test_merge_is_sahis_on_objects_cut_by_tile_borders(sahi: SimpleNamespace, settings: TileSettings) -> None:
    per_tile, tiles, full = crafted_tiles(settings)
    found = concatenate([*(to_image(d, t, IMAGE) for d, t in zip(per_tile, tiles)), full], IMAGE)
    assert_same(merge_tiles(per_tile, tiles, IMAGE, settings, full), sahi_merge(sahi, found, settings))


def test_a_shape_on_a_tile_border_is_one_box() -> None:
    settings = TileSettings(128, 0.25)  # greedy merging by IoS >= 0.5
    per_tile, tiles, full = crafted_tiles(settings)
    merged = merge_tiles(per_tile, tiles, IMAGE, settings, full)
    for obj in (0, 1, 2, 3, 4, 5):
        views = [seen_in(tile, OBJECTS[obj : obj + 1], OBJECT_IDS[obj : obj + 1]) for tile in tiles]
        shown = [float(v.scores[0]) for v in views if len(v)]
        assert len(shown) >= 2 and min(shown) < 0.9  # seen in several tiles, cut by a border in some
        same = (merged.label_ids == OBJECT_IDS[obj]) & (box_ios(merged.boxes, OBJECTS[obj : obj + 1])[:, 0] > 0)
        assert same.sum() == 1
        (index,) = np.flatnonzero(same)
        np.testing.assert_array_equal(merged.boxes[index], OBJECTS[obj])
        assert merged.scores[index] == np.float32(0.9) and merged.labels[index] == LABELS[OBJECT_IDS[obj]]
    touching = [tuple(box) for box, i in zip(merged.boxes.tolist(), merged.label_ids) if i == 0 and box[1] == 100]
    assert sorted(touching) == [tuple(OBJECTS[8]), tuple(OBJECTS[9])]
    assert (np.diff(merged.scores) <= 0).all()


# --------------------------------------------------------------------------- SAHI's rules, one at a time

TIES = detections(
    [
        [20, 10, 60, 50],  # 0: ties 1 on score, first by x0 so it is kept: it takes 1 (IoS 0.75), not 2 (0.25)
        [30, 10, 70, 50],  # 1: were 1 kept, it would take 2 (IoS exactly 0.5) and grow to [20, 10, 90, 50]
        [50, 10, 90, 50],  # 2: kept on its own
        [200, 0, 210, 10],  # 3: kept; takes 4 (inside it: IoS 1) and 5 (IoS exactly 0.5)
        [200, 0, 210, 90],  # 4: grows 3 to [200, 0, 210, 90]
        [205, 0, 225, 20],  # 5: IoS 0.25 with the grown box: dropped, not kept
        [300, 300, 340, 340],  # 6 and 7: the same box, two labels: never merged
        [300, 300, 340, 340],
        [300, 300, 340, 340],  # 8: 6 exactly (box, score, label): merged into 6
    ],
    [0.8, 0.8, 0.7, 0.9, 0.8, 0.7, 0.5, 0.5, 0.5],
    [0, 0, 0, 1, 1, 1, 2, 0, 2],
    (400, 400),
)


def test_greedy_merge_rules() -> None:
    merged = merge_detections(TIES, TileSettings(128))
    assert rows(merged) == [
        ((200.0, 0.0, 210.0, 90.0), pytest.approx(0.9), 1, "person"),
        ((20.0, 10.0, 70.0, 50.0), pytest.approx(0.8), 0, "car"),
        ((50.0, 10.0, 90.0, 50.0), pytest.approx(0.7), 0, "car"),
        ((300.0, 300.0, 340.0, 340.0), pytest.approx(0.5), 0, "car"),
        ((300.0, 300.0, 340.0, 340.0), pytest.approx(0.5), 2, "boat"),
    ]


@pytest.mark.parametrize("settings", MERGES, ids=SETTINGS_IDS)
def test_ties_and_thresholds_are_sahis(sahi: SimpleNamespace, settings: TileSettings) -> None:
    assert_same(merge_detections(TIES, settings), sahi_merge(sahi, TIES, settings))
