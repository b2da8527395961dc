"""What the Python API accepts, checked up front: thresholds, prompts, labels, and the keyword
arguments of ``from_pretrained`` and ``forward`` (none silently dropped).

The image side is spied on: a refused call must not have encoded any image.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gdino import CheckpointError, GroundingDinoForObjectDetection, GroundingDinoProcessor, PromptError
from gdino.apps.label import LabelError, parse_classes
from reference import prefill_hub_cache

REPO = "IDEA-Research/grounding-dino-tiny"


@pytest.fixture(scope="module")
def image(data_dir) -> Image.Image:
    return Image.open(data_dir / "chelsea.png").convert("RGB")


@pytest.fixture
def encoder_calls(fast_model, monkeypatch) -> list[int]:
    """Counts calls of the image side (Swin and the input projections)."""
    calls: list[int] = []
    original = fast_model.image_features
    monkeypatch.setattr(fast_model, "image_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("box_threshold", -1),
        ("box_threshold", math.nan),
        ("box_threshold", 2),
        ("box_threshold", math.inf),
        ("box_threshold", "0.3"),
        ("box_threshold", True),
        ("text_threshold", math.nan),
        ("text_threshold", -0.5),
        ("nms_threshold", 2),
        ("nms_threshold", math.nan),
        ("nms_threshold", -1),
    ],
)
def test_bad_thresholds_are_refused_before_any_image_work(fast_model, image, encoder_calls, argument, value):
    with pytest.raises(ValueError, match=argument):
        fast_model.detect(image, "a cat.", **{argument: value})
    with pytest.raises(ValueError, match=argument):
        fast_model.detect(image, ["cat", "dog"], **{argument: value})
    assert encoder_calls == []


def test_threshold_bounds_are_allowed(fast_model, image):
    everything = fast_model.detect(image, ["cat", "dog"], box_threshold=0, nms_threshold=1)
    assert len(everything) == fast_model.config.num_queries
    assert len(fast_model.detect(image, "a cat.", box_threshold=np.float32(1.0), text_threshold=0)) == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"threshold": math.nan}, "threshold"),
        ({"box_threshold": 2.0}, "box_threshold"),
        ({"threshold": -1}, "threshold"),
        ({"text_threshold": math.inf}, "text_threshold"),
    ],
)
def test_post_processing_checks_thresholds(kwargs, needle):
    processor = GroundingDinoProcessor.default()
    outputs = SimpleNamespace(logits=torch.zeros(1, 5, 256), pred_boxes=torch.full((1, 5, 4), 0.5))
    ids = processor(text="a cat.")["input_ids"]
    with pytest.raises(ValueError, match=needle):
        processor.post_process_grounded_object_detection(outputs, ids, **kwargs)
    assert len(processor.post_process_grounded_object_detection(outputs, ids, threshold=0.0)[0]["scores"]) == 5


# --------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("", "empty"),
        ("  \n", "empty"),
        (".", "no phrase"),
        ([], "empty"),
        ([""], "label 0"),
        (["cat", " . "], "label 1"),
        ([["cat"], []], "empty"),
        (". ".join(["a cat"] * 100), "256"),
        (None, "give a prompt"),
        (3, "int"),
    ],
)
def test_bad_prompts_are_refused_before_the_image_is_encoded(fast_model, image, encoder_calls, prompt, needle):
    with pytest.raises(PromptError, match=needle):
        fast_model.detect([image, image], prompt)
    assert encoder_calls == []


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        ({"prompt": ["cat", "cat"]}, "'cat' is given twice"),
        ({"prompt": ["cat", "Cat"]}, "same label"),
        ({"labels": ["traffic_light", "traffic light"]}, "same label"),
        ({"prompt": ["st. bernard", "St Bernard"]}, "same label"),
        ({"prompt": [["cat"], ["dog", "dog"]]}, "twice"),
        ({"prompts": ["a cat.", ["dog", "DOG"]]}, "same label"),
    ],
)
def test_duplicate_labels_are_refused(fast_model, image, encoder_calls, call, needle):
    with pytest.raises(PromptError, match=needle):
        fast_model.detect([image, image], **call)
    assert encoder_calls == []


def test_detect_and_label_share_the_duplicate_rule(fast_model):
    for classes in ("cat,dog,cat", "cat, Cat", "traffic_light,traffic light"):
        with pytest.raises(LabelError) as refused:
            parse_classes(classes)
        with pytest.raises(PromptError) as detect_refused:
            fast_model.phrases([name.strip() for name in classes.split(",")])
        assert str(detect_refused.value) in str(refused.value)
    assert parse_classes("cat,dog") == ["cat", "dog"]
    assert fast_model.phrases(labels=["cat", "dog"]) == ["cat", "dog"]


def test_prompt_keywords_are_exclusive(fast_model, image, encoder_calls):
    with pytest.raises(PromptError, match="prompt and labels"):
        fast_model.detect(image, "a cat.", labels=["cat"])
    with pytest.raises(PromptError, match="labels and prompts"):
        fast_model.detect(image, labels=["cat"], prompts=["a cat."])
    with pytest.raises(PromptError, match="token_spans"):
        fast_model.detect(image, "the man", labels=["man"], token_spans=[[(0, 7)]])
    with pytest.raises(PromptError, match="a string"):
        fast_model.detect(image, labels="cat")
    with pytest.raises(PromptError, match="1 entries for 2 images"):
        fast_model.detect([image, image], prompts=["a cat."])
    with pytest.raises(PromptError, match="mixes strings and lists"):
        fast_model.detect([image, image], ["a cat.", ["dog"]])
    assert encoder_calls == []


@pytest.mark.slow  # several images at 800 pixels
def test_a_list_of_strings_is_one_label_list_for_any_number_of_images(fast_model, image, data_dir):
    """``["st. bernard"]`` is one label, alone or with others, with one image or several."""
    other = Image.open(data_dir / "coffee.png").convert("RGB")
    alone = fast_model.detect(image, ["st. bernard"], box_threshold=0.0)
    assert set(alone.labels) == {"st. bernard"} and set(alone.label_ids.tolist()) == {0}
    explicit = fast_model.detect(image, labels=["st bernard"], box_threshold=0.0)
    np.testing.assert_allclose(alone.scores, explicit.scores, atol=1e-6)
    assert fast_model.phrases(["st. bernard"]) == ["st. bernard"]

    labels = ["st. bernard", "cat"]
    both = fast_model.detect([image, other], labels, box_threshold=0.0)
    for found, single in zip(both, (image, other)):
        expected = fast_model.detect(single, labels, box_threshold=0.0)
        assert set(found.labels) <= set(labels)
        assert found.labels == expected.labels
        np.testing.assert_allclose(found.scores, expected.scores, atol=1e-6)
    assert [f.labels for f in fast_model.detect([image, other], labels=labels, box_threshold=0.0)] == [
        f.labels for f in both
    ]


@pytest.mark.slow  # several images at 800 pixels
def test_per_image_prompts(fast_model, image, data_dir):
    other = Image.open(data_dir / "coffee.png").convert("RGB")
    first, second = fast_model.detect(
        [image, other], prompts=["a cat. a remote control.", ["cup", "table"]], box_threshold=0.0, text_threshold=0.0
    )
    assert set(first.labels) <= {"a cat", "a remote control"} and set(second.labels) <= {"cup", "table"}
    np.testing.assert_allclose(
        first.scores,
        fast_model.detect(image, "a cat. a remote control.", box_threshold=0.0, text_threshold=0.0).scores,
        atol=1e-6,
    )
    nested = fast_model.detect([image, other], [["cat"], ["cup", "table"]], box_threshold=0.0)
    assert set(nested[0].labels) == {"cat"}
    np.testing.assert_allclose(nested[1].scores, second.scores, atol=1e-6)


# --------------------------------------------------------------------------- from_pretrained and forward


def _second_revision(cache: Path, source: Path, commit: str) -> None:
    """Adds ``source``'s files to the cached repo as another snapshot (a commit without a ref)."""
    snapshot = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).symlink_to(f.resolve())


def test_processor_honours_revision_and_cache_dir(small_dir, fast_dir, tmp_path):
    cache = tmp_path / "hub"
    prefill_hub_cache(small_dir, cache, REPO)  # main: 800 pixels on the short side
    commit = "1" * 40
    _second_revision(cache, fast_dir, commit)  # this commit: 160
    main = GroundingDinoProcessor.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    pinned = GroundingDinoProcessor.from_pretrained(REPO, cache_dir=cache, local_files_only=True, revision=commit)
    assert main.image_settings.shortest_edge == 800
    assert pinned.image_settings.shortest_edge == 160
    with pytest.raises(CheckpointError, match="local_files_only"):
        GroundingDinoProcessor.from_pretrained(REPO, cache_dir=cache, local_files_only=True, revision="2" * 40)


def test_hub_options_reach_the_hub_client(small_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls: list[dict] = []

    def snapshot_download(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        return str(small_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    options = {
        "revision": "v2",
        "token": "hf_secret",
        "local_files_only": False,
        "force_download": True,
        "cache_dir": tmp_path,
    }
    GroundingDinoProcessor.from_pretrained("someone/model", **options)
    GroundingDinoForObjectDetection.from_pretrained("someone/model", **options)
    assert len(calls) == 2
    for call in calls:
        assert call["repo_id"] == "someone/model"
        assert {k: call[k] for k in options} == options


def test_torch_dtype_is_another_name_for_dtype(fast_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 may be emulated on this CPU
        by_alias = GroundingDinoForObjectDetection.from_pretrained(fast_dir, torch_dtype=torch.bfloat16)
        by_name = GroundingDinoForObjectDetection.from_pretrained(
            fast_dir, torch_dtype="bfloat16", dtype=torch.bfloat16
        )
    for net in (by_alias, by_name):
        assert net.backbone.patch_embed.proj.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        GroundingDinoForObjectDetection.from_pretrained(fast_dir, dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"torch.dtype"):
        GroundingDinoForObjectDetection.from_pretrained(fast_dir, torch_dtype="half-ish")


def test_unknown_arguments_are_refused(fast_model, image, fast_dir):
    with pytest.raises(TypeError, match="device_map"):
        GroundingDinoForObjectDetection.from_pretrained(fast_dir, device_map="auto")
    with pytest.raises(TypeError, match="trust_remote_code"):
        GroundingDinoProcessor.from_pretrained(fast_dir, trust_remote_code=True)
    inputs = fast_model.processor(images=image, text="a cat.")
    with torch.inference_mode():
        with pytest.raises(TypeError, match="pixel_masks"):
            fast_model(**{**inputs, "pixel_masks": inputs["pixel_mask"]})
        with pytest.raises(TypeError, match="output_attentions"):
            fast_model(**inputs, output_attentions=True)
        assert fast_model(**inputs).logits.shape == (1, fast_model.config.num_queries, fast_model.config.max_text_len)
