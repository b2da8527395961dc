"""The packaged gdino-shapes-sam segmenter on never-seen generated images: mask IoU with ground-truth
box prompts, and COCO segm AP50 next to bbox AP50 for gdino-shapes' own detections."""

from __future__ import annotations

import io

import numpy as np
import pytest

from gdino.inference.segmenter import Segmenter
from gdino.training.segmenter_data import split_scenes
from gdino.training.segmenter_eval import scene_ious
from gdino.training.shapes import ShapesSettings, find_photos, load_photos, write_shapes_dataset

pytestmark = pytest.mark.slow  # runs both packaged models over a few dozen images (about 45 s on 2 busy cores)
pytest.importorskip("pycocotools")
pytest.importorskip("cv2")


# The packaged model misses both targets (issue 21 item 7): trained 2000 steps from scratch, it
# segments every shape in the image whatever the box (its masks have IoU 0.86 with the union of all
# objects, 0.39 with the prompted one). strict: these fail loudly once a retrained model meets them.
MISSED = pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="gdino-shapes-sam ignores its box prompt (mean IoU 0.30)"
)


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.from_pretrained("gdino-shapes-sam")


@MISSED
def test_ground_truth_boxes_give_masks_of_mean_iou_at_least_0_9(segmenter):
    photos = load_photos(find_photos())
    for split in ("val", "held_out"):  # images and (held_out) colour-shape pairs the training never saw
        ious = scene_ious(segmenter, split_scenes(split, 0, 20, 0, ShapesSettings(), photos))
        assert len(ious) > 40
        assert np.mean(ious) >= 0.9, (split, np.mean(ious))


@MISSED
def test_segm_ap50_is_within_0_05_of_bbox_ap50_for_the_shapes_detector(tmp_path, segmenter):
    from gdino.evaluation.coco import evaluate_coco, model_detector
    from gdino.inference.detector import GroundingDinoForObjectDetection

    paths = write_shapes_dataset(tmp_path, {"val": 16}, seed=0, image_format="png", masks=True)
    detector = GroundingDinoForObjectDetection.from_pretrained("gdino-shapes")
    result = evaluate_coco(
        tmp_path,
        paths["val"],
        lambda names: model_detector(detector, names),
        log=io.StringIO(),
        make_segmenter=lambda: lambda image, boxes: segmenter.segment(image, boxes)[0].to_rle(),
    )
    assert result.mask_metrics is not None
    bbox, segm = result.metrics["AP50"], result.mask_metrics["AP50"]
    assert bbox > 0.5  # the detector finds the shapes
    assert segm >= bbox - 0.05, (bbox, segm)
