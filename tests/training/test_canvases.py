"""Large canvases of small shapes (``gdino.training.canvases``) and what tiled detection does with them:
with the packaged ``gdino-shapes`` model, tiles find the 15-60 pixel shapes that whole-image
detection loses, and a shape on a tile border comes back as one box."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.postprocess import box_iou
from gdino.inference.tiles import TileSettings, concatenate, tile_grid, to_image
from gdino.training.canvases import CanvasSettings, render_canvas, write_canvases
from gdino.training.shapes import pair_names

TILE = TileSettings(192, 0.2)  # gdino-shapes was trained on 256-384 px images resized to 240: 15-60 px shapes
# in a 192 px tile are 8-31% of its side, as its training objects were


def test_canvases_are_deterministic_and_annotated(tmp_path) -> None:
    settings = CanvasSettings(size=(600, 400), shapes=25, clutter=40)
    a, b = (render_canvas(np.random.default_rng([3, 1]), settings) for _ in range(2))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (400, 600, 3) and a.image.dtype == np.uint8
    assert len(a.boxes) == len(a.pairs) >= 20
    sides = np.concatenate([a.boxes[:, 2] - a.boxes[:, 0], a.boxes[:, 3] - a.boxes[:, 1]])
    assert sides.min() >= 8 and sides.max() <= 62  # 15-60 px shapes; a triangle is flatter than its circle
    apart = box_iou(a.boxes, a.boxes) - np.eye(len(a.boxes))
    assert apart.max() == 0  # no shape touches another
    for box, pair in zip(a.boxes.astype(int), a.pairs):  # the box holds the shape's colour
        colour = a.image[box[1] : box[3], box[0] : box[2]].reshape(-1, 3).astype(int)
        from gdino.training.shapes import COLOURS

        target = np.array(COLOURS[pair_names()[pair].split(" ")[0]])
        assert (np.abs(colour - target).max(axis=1) <= 30).mean() > 0.25
    path = write_canvases(tmp_path / "canvases", 2, settings, seed=3)
    data = json.loads(path.read_text())
    assert [im["file_name"] for im in data["images"]] == ["canvas_000.png", "canvas_001.png"]
    assert Image.open(tmp_path / "canvases" / "canvas_000.png").size == (600, 400)
    first = [x for x in data["annotations"] if x["image_id"] == 1]
    again = render_canvas(np.random.default_rng([3, 0]), settings)
    np.testing.assert_allclose([x["bbox"][:2] for x in first], again.boxes[:, :2])
    assert {c["id"] for c in data["categories"]} == set(range(1, 25))


def ap50(truth_boxes: np.ndarray, truth_pairs: tuple[int, ...], found: Detections) -> float:
    """pycocotools' AP at IoU 0.5 of one image's detections (label ids index ``pair_names``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    width, height = found.image_size
    boxes = [[float(x0), float(y0), float(x1 - x0), float(y1 - y0)] for x0, y0, x1, y1 in truth_boxes]
    truth = COCO()
    truth.dataset = {
        "images": [{"id": 1, "width": width, "height": height}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": p + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (b, p) in enumerate(zip(boxes, truth_pairs))
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(pair_names())],
    }
    if not len(found):
        return 0.0
    results = [
        {"image_id": 1, "category_id": int(i) + 1, "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
        | {"score": float(s)}
        for (x0, y0, x1, y1), s, i in zip(found.boxes, found.scores, found.label_ids)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[1])


@pytest.fixture(scope="module")
def shapes_model():
    from gdino import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").eval()


@pytest.mark.slow  # about 70 tiles of a 1500x1000 canvas (about 15 s on an idle 2-core machine)
def test_tiles_find_the_small_shapes_whole_image_detection_loses(shapes_model) -> None:
    canvas = render_canvas(np.random.default_rng([23, 0]), CanvasSettings(size=(1500, 1000), shapes=40, clutter=80))
    image = Image.fromarray(canvas.image)
    tiled = shapes_model.detect(image, pair_names(), tiles=TILE, batch_size=8)
    whole = shapes_model.detect(image, pair_names())
    assert ap50(canvas.boxes, canvas.pairs, tiled) >= 0.75
    assert ap50(canvas.boxes, canvas.pairs, whole) < 0.3


def border_spots(settings: CanvasSettings, tile: TileSettings) -> list[tuple[float, float, float]]:
    """Shapes centred exactly on tile borders: on every vertical and horizontal edge of the grid's
    first tiles, and on the corners where four tiles meet."""
    width, height = settings.size
    tiles = tile_grid(width, height, tile)
    xs = sorted({t[0] for t in tiles if t[0] > 0} | {t[2] for t in tiles if t[2] < width})
    ys = sorted({t[1] for t in tiles if t[1] > 0} | {t[3] for t in tiles if t[3] < height})
    rng = np.random.default_rng(5)
    spots = [(float(x), float(y), float(rng.uniform(20, 30))) for x in xs[::2] for y in ys[::2]]  # corners
    spots += [(float(x), 64.0, 24.0) for x in xs]  # vertical edges, near the top
    spots += [(64.0, float(y), 24.0) for y in ys]  # horizontal edges, on the left
    kept: list[tuple[float, float, float]] = []
    for spot in spots:  # keep the shapes apart
        if all(max(abs(spot[0] - o[0]), abs(spot[1] - o[1])) > spot[2] + o[2] + 8 for o in kept):
            kept.append(spot)
    return kept


@pytest.mark.slow  # 12 tiles twice (merged and one by one)
def test_a_shape_on_a_tile_border_comes_back_as_one_box(shapes_model) -> None:
    settings = CanvasSettings(size=(640, 448), clutter=30, shape_size=(40, 60))
    spots = border_spots(settings, TILE)
    assert len(spots) >= 8
    canvas = render_canvas(np.random.default_rng(11), settings, spots=spots)
    image = Image.fromarray(canvas.image)
    merged = shapes_model.detect(image, pair_names(), tiles=TILE)
    tiles = tile_grid(*image.size, TILE)
    one_by_one = concatenate(
        [to_image(shapes_model.detect(image.crop(t), pair_names()), t, image.size) for t in tiles], image.size
    )

    def hits(found: Detections) -> np.ndarray:
        """(N,) how many boxes of each shape's label have their centre in the shape's box."""
        centres = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
        return np.array(
            [
                int(((found.label_ids == p) & (centres >= box[:2]).all(1) & (centres <= box[2:]).all(1)).sum())
                for box, p in zip(canvas.boxes, canvas.pairs)
            ]
        )

    assert hits(one_by_one).max() >= 2  # the tiles alone see the border shapes twice or more
    assert hits(merged).max() <= 1  # merged: never a duplicate
    assert (hits(merged) == 1).mean() >= 0.8  # and most are found
    iou = box_iou(canvas.boxes, merged.boxes)  # (N, M)
    assert (iou.max(axis=1) >= 0.5).mean() >= 0.8  # as whole boxes, not the halves of two tiles
