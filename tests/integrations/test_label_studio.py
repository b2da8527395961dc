"""``gdino.integrations.label_studio``: the labelling config's labels (values, predicted_values, aliases), results
in Label Studio's JSON (rectangles in percent with scores, brush masks in its RLE) and config errors. The brush
RLE is decoded here by rle-pack's published decoding (the format Label Studio's brush tool reads), written out
below. The HTTP routes: tests/apps/server/test_label_studio_routes.py; against a real Label Studio:
tests/integrations/test_label_studio_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest

from brush_rle import decode_brush_rle
from ellipse_segmenter import EllipseSegmenter
from gdino.integrations.label_studio import (
    LabelStudioError,
    encode_brush_rle,
    read_config,
    read_prompt_field,
    results,
    values_for_phrases,
)

CONFIG = """
<View>
  <Image name="image" value="$img"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Cat" predicted_values="kitten, tabby"/>
    <Label value="Remote" alias="remote control"/>
  </RectangleLabels>
  <BrushLabels name="brush" toName="image">
    <Label value="Cat"/>
  </BrushLabels>
</View>"""


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (40, 30), (300, 400)])
def test_brush_rle_decodes_to_the_masks_rgba_bytes(shape) -> None:
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    mask[: shape[0] // 2, : shape[1] // 2] = True  # long runs as well as short ones
    expected = np.repeat(np.where(mask.reshape(-1), 255, 0), 4)
    np.testing.assert_array_equal(decode_brush_rle(encode_brush_rle(mask)), expected)


def test_brush_rle_splits_runs_longer_than_its_widest_length() -> None:
    mask = np.ones((300, 300), bool)  # 360,000 bytes of 255: six runs of at most 65,536
    np.testing.assert_array_equal(decode_brush_rle(encode_brush_rle(mask)), np.full(360_000, 255, np.uint8))


def test_brush_rle_matches_label_studios_own_decoder() -> None:
    brush = pytest.importorskip("label_studio_converter.brush", reason="label-studio-converter is not installed")
    mask = np.random.default_rng(3).random((64, 48)) > 0.5
    np.testing.assert_array_equal(
        brush.decode_rle(encode_brush_rle(mask)), np.repeat(np.where(mask.ravel(), 255, 0), 4)
    )


def test_config_gives_labels_aliases_and_the_image_key() -> None:
    rectangles, brush = read_config(CONFIG)
    assert (rectangles.kind, rectangles.from_name, rectangles.to_name, rectangles.image_key) == (
        "RectangleLabels",
        "label",
        "image",
        "img",
    )
    assert rectangles.values == ("Cat", "Remote")
    assert rectangles.prompt_texts == ("Cat", "kitten", "tabby", "Remote", "remote control")
    assert rectangles.prompts == (0, 0, 0, 1, 1)
    assert (brush.kind, brush.values, brush.prompt_texts) == ("BrushLabels", ("Cat",), ("Cat",))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("<View><Image", "not valid XML"),
        ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"/></View>', "no RectangleLabels"),
        ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"/></View>', "has no labels"),
        ('<View><RectangleLabels name="r" toName="x"><Label value="a"/></RectangleLabels></View>', "no Image tag"),
        (
            '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">'
            '<Label value="Cat"/><Label value="cat"/></RectangleLabels></View>',
            "the same label to the model",
        ),
    ],
)
def test_bad_configs_say_why(config: str, message: str) -> None:
    with pytest.raises(LabelStudioError, match=message):
        read_config(config)


@pytest.mark.slow  # the ellipse masks of every box at chelsea.png's full size, and their RLE
def test_results_are_percent_boxes_with_scores_and_brush_masks(fast_model, data_dir) -> None:
    rectangles, brush = read_config(CONFIG)
    image = data_dir / "chelsea.png"
    found = fast_model.detect(image, labels=list(rectangles.prompt_texts), box_threshold=0.2)
    assert len(found) > 0
    width, height = found.image_size
    boxes = results(found, [rectangles])
    assert len(boxes) == len(found)
    for i, result in enumerate(boxes):
        x0, y0, x1, y1 = np.clip(found.boxes[i], 0, [width, height, width, height]).tolist()  # clipped to the image
        assert result["type"] == "rectanglelabels" and result["from_name"] == "label" and result["to_name"] == "image"
        assert (result["original_width"], result["original_height"]) == (width, height)
        assert result["value"]["rectanglelabels"] == [rectangles.values[rectangles.prompts[int(found.label_ids[i])]]]
        np.testing.assert_allclose(
            [result["value"][k] for k in ("x", "y", "width", "height")],
            [100 * x0 / width, 100 * y0 / height, 100 * (x1 - x0) / width, 100 * (y1 - y0) / height],
        )
        assert result["score"] == round(float(found.scores[i]), 4)
    assert results(found, [rectangles, brush]) == boxes, "no masks: no brush results"
    masked = EllipseSegmenter().add_masks(image, found)
    both = results(masked, [rectangles, brush])
    cats = [i for i in range(len(found)) if rectangles.prompts[int(found.label_ids[i])] == 0]
    painted = [r for r in both if r["type"] == "brushlabels"]
    assert len(both) == len(found) + len(cats) and len(painted) == len(cats)
    for result, i in zip(painted, cats):
        assert result["value"]["brushlabels"] == ["Cat"] and result["from_name"] == "brush"
        decoded = decode_brush_rle(result["value"]["rle"]).reshape(height, width, 4)
        np.testing.assert_array_equal(decoded[:, :, 0] == 255, masked.masks.mask(i))


def test_an_alias_differing_only_in_case_adds_no_prompt() -> None:
    config = CONFIG.replace('alias="remote control"', 'alias="remote" predicted_values="REMOTE, remote control"')
    rectangles = read_config(config)[0]
    assert rectangles.prompt_texts == ("Cat", "kitten", "tabby", "Remote", "remote control")
    assert rectangles.prompts == (0, 0, 0, 1, 1)


def test_a_textarea_on_the_image_is_the_prompt_field() -> None:
    typed = CONFIG.replace(
        "</View>", '<TextArea name="prompt" toName="image"/><TextArea name="note" toName="x"/></View>'
    )
    assert read_prompt_field(typed) == "prompt"
    assert read_prompt_field(CONFIG) is None


def test_phrases_of_a_typed_prompt_name_labels_case_insensitively() -> None:
    rectangles = read_config(CONFIG)[0]
    assert values_for_phrases(["kitten", "Remote Control", "dog", "cat"], rectangles) == ["Cat", "Remote", None, "Cat"]
    single = read_config(CONFIG.replace('<Label value="Remote" alias="remote control"/>', ""))[0]
    assert values_for_phrases(["dog", "a thing"], single) == ["Cat", "Cat"], "one label: every box gets it"
