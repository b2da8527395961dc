"""``gdino.integrations.sahi``: SAHI's ``get_sliced_prediction`` running gdino through ``GdinoDetectionModel``
gives the boxes of gdino's own tiling on the same image (SAHI 0.12.8, a test-only reference)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from gdino.inference.detections import Detections
from gdino.inference.tiles import TileSettings, merge_tiles, tile_grid

sahi_predict = pytest.importorskip("sahi.predict")
from gdino.integrations.sahi import GdinoDetectionModel  # after importorskip: needs sahi

LABELS = ["cat", "sofa", "remote control"]


@pytest.fixture(scope="module")
def picture(data_dir) -> Image.Image:
    return Image.open(data_dir / "chelsea.png").convert("RGB").resize((400, 300))


def sahi_rows(result) -> list[tuple[str, float, tuple[float, ...]]]:
    """(label, score, box) of SAHI's merged predictions, best first (ties by box)."""
    rows = [(p.category.name, round(p.score.value, 5), tuple(p.bbox.to_xyxy())) for p in result.object_prediction_list]
    return sorted(rows, key=lambda r: (-r[1], r[2]))


def our_rows(found: Detections) -> list[tuple[str, float, tuple[float, ...]]]:
    rows = [
        (label, round(float(s), 5), tuple(float(v) for v in b))
        for b, s, label in zip(found.boxes, found.scores, found.labels)
    ]
    return sorted(rows, key=lambda r: (-r[1], r[2]))


@pytest.mark.slow  # 12 tiles twice (through SAHI and one by one), and our tiling
@pytest.mark.parametrize(("merge", "sahi_type", "metric"), [("greedynmm", "GREEDYNMM", "IOS"), ("nms", "NMS", "IOU")])
def test_sliced_prediction_equals_our_tiling(fast_model, picture, merge: str, sahi_type: str, metric: str) -> None:
    detector = GdinoDetectionModel(model=fast_model, labels=LABELS, confidence_threshold=0.2)
    assert detector.category_names == LABELS and detector.num_categories == 3
    result = sahi_predict.get_sliced_prediction(
        np.asarray(picture),
        detector,
        slice_height=160,
        slice_width=160,
        overlap_height_ratio=0.2,
        overlap_width_ratio=0.2,
        perform_standard_pred=True,
        postprocess_type=sahi_type,
        postprocess_match_metric=metric,
        postprocess_match_threshold=0.5,
        postprocess_class_agnostic=False,
        verbose=0,
    )
    settings = TileSettings(160, 0.2, merge=merge)
    theirs = sahi_rows(result)
    assert_same_rows(theirs, our_rows(sahi_boxes_merged(fast_model, picture, settings)))
    ours = fast_model.detect(picture, LABELS, 0.2, tiles=settings)  # gdino's own tiling, boxes as the model gave them
    assert len(theirs) == len(ours) > 0
    assert [(label, score) for label, score, _ in theirs] == [(label, score) for label, score, _ in our_rows(ours)]


def assert_same_rows(
    a: list[tuple[str, float, tuple[float, ...]]], b: list[tuple[str, float, tuple[float, ...]]]
) -> None:
    assert [(label, score) for label, score, _ in a] == [(label, score) for label, score, _ in b]
    np.testing.assert_allclose([box for *_, box in a], [box for *_, box in b], atol=1e-3)


def sahi_boxes_merged(model, picture: Image.Image, settings: TileSettings) -> Detections:
    """Our merge of our per-tile detections, each box's top-left clamped to its tile: SAHI's
    ``BoundingBox`` clamps a slice's negative coordinates to 0, so what a tile saw past its
    top or left border is lost (past its bottom or right it is kept, as in our tiling)."""
    tiles = tile_grid(*picture.size, settings)
    per_tile = []
    for tile in tiles:
        found = model.detect(picture.crop(tile), LABELS, 0.2)
        boxes = found.boxes.copy()
        boxes[:, :2] = np.maximum(boxes[:, :2], 0)
        per_tile.append(replace(found, boxes=boxes))
    full = model.detect(picture, LABELS, 0.2)
    full = replace(full, boxes=np.clip(full.boxes, 0, [*picture.size, *picture.size]).astype(np.float32))
    return merge_tiles(per_tile, tiles, picture.size, settings, full)


@pytest.mark.slow  # two sliced predictions
def test_batched_slices_and_phrase_prompts(fast_model, picture) -> None:
    detector = GdinoDetectionModel(model=fast_model, prompt="a cat. a sofa.", confidence_threshold=0.2)
    assert detector.category_names == ["a cat", "a sofa"]
    kwargs = {"slice_height": 200, "slice_width": 200, "verbose": 0, "postprocess_class_agnostic": False}
    one = sahi_predict.get_sliced_prediction(np.asarray(picture), detector, batch_size=1, **kwargs)
    four = sahi_predict.get_sliced_prediction(np.asarray(picture), detector, batch_size=4, **kwargs)
    assert len(sahi_rows(one)) > 0  # the 4 slices of a batch go through the model together: equal to rounding
    assert [label for label, *_ in sahi_rows(one)] == [label for label, *_ in sahi_rows(four)]
    np.testing.assert_allclose([s for _, s, _ in sahi_rows(one)], [s for _, s, _ in sahi_rows(four)], atol=1e-4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="give labels"):
        GdinoDetectionModel(load_at_init=False)
    with pytest.raises(ValueError, match="give labels"):
        GdinoDetectionModel(labels=["cat"], prompt="a cat.", load_at_init=False)
    with pytest.raises(TypeError, match="GroundingDinoForObjectDetection"):
        GdinoDetectionModel(model=object(), labels=["cat"])  # type: ignore[arg-type]
