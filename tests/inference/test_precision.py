"""bfloat16 against float32 on the full-size parity checkpoint, as the speed issue measures it.

The top 900 proposal scores of this random checkpoint nearly tie (about 4e-4 apart), so bfloat16
rounding in the encoder reorders the selected queries. Each query slot has its own learnt content
embedding, so a reordered query becomes a different detection: the issue's bound (IoU >= 0.9 and
scores within 0.02 over the top 100) is checked with both precisions decoding the same selected
queries, and the selection itself is checked to change only at the margin.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from agreement import MAX_SCORE_DIFF, MIN_IOU, match_top_queries, selection_overlap
from gdino import AutoModelForZeroShotObjectDetection

pytestmark = pytest.mark.slow  # the full-size model in float32 and bfloat16


@pytest.fixture(scope="module")
def runs(our_model, our_processor, parity_dir, data_dir):
    low = AutoModelForZeroShotObjectDetection.from_pretrained(parity_dir, dtype=torch.bfloat16)
    out = []
    for name, prompt in (("chelsea.png", "a cat. a remote control."), ("astronaut.png", ["person", "flag"])):
        inputs = our_processor(images=Image.open(data_dir / name), text=prompt)
        with torch.inference_mode():
            full = our_model(**inputs)
            free = low(**inputs)
            same = low(**inputs, query_index=full.query_index)
        out.append((full, free, same))
    return out


def test_bf16_detections_match_fp32_on_the_same_queries(runs):
    for full, _, same in runs:
        assert torch.equal(same.query_index, full.query_index)
        agreement = match_top_queries(full.logits, full.pred_boxes, same.logits, same.pred_boxes)
        assert agreement["nan_queries"] == 0
        assert agreement["same_query"] == agreement["pairs"] == 100
        assert agreement["min_iou"] >= MIN_IOU and agreement["max_score_diff"] <= MAX_SCORE_DIFF, agreement


def test_bf16_selects_nearly_the_same_image_tokens(runs):
    for full, free, _ in runs:
        assert free.pred_boxes.isfinite().all() and not free.logits.isnan().any()
        overlap = selection_overlap(full.query_index, free.query_index)
        assert overlap["shared_tokens"] >= 0.9 * overlap["queries"], overlap


def test_forced_query_index_is_checked(our_model, our_processor, data_dir):
    inputs = our_processor(images=Image.open(data_dir / "chelsea.png"), text="a cat.")
    with pytest.raises(ValueError, match="query index must be"):
        our_model(**inputs, query_index=torch.zeros(1, 5, dtype=torch.long))
