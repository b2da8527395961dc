"""The forgetting benchmark's data, scores, pseudo-label replay and distillation (small sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gdino import GroundingDinoForObjectDetection
from gdino.training.distill import distillation_terms
from gdino.training.forgetting import mean_ap50
from gdino.training.forgetting_data import all_pair_names, new_pair_names, seen_pairs, write_forgetting_dataset
from gdino.training.replay import pseudo_label, read_classes, with_classes
from gdino.training.samples import Dataset, Sample
from gdino.training.settings import TrainError, TrainSettings
from gdino.training.trainer import keep_classes_of


def test_new_pairs_follow_the_old_ids() -> None:
    names = all_pair_names()
    assert names[:24] == all_pair_names()[:24] and len(names) == 35
    assert new_pair_names()[:4] == ["pink circle", "pink square", "pink triangle", "pink star"]
    assert new_pair_names()[-1] == "pink hexagon" and len(new_pair_names()) == 11
    assert "green triangle" not in seen_pairs() and len(seen_pairs()) == 21


def test_user_split_annotates_only_new_concepts(tmp_path: Path) -> None:
    files = write_forgetting_dataset(tmp_path, {"train": 6, "new": 4})
    train = json.loads(files["train"].read_text())
    new_ids = {all_pair_names().index(p) + 1 for p in new_pair_names()}
    assert {c["id"] for c in train["categories"]} == new_ids
    assert train["annotations"] and all(a["category_id"] in new_ids for a in train["annotations"])
    per_image = {a["image_id"] for a in train["annotations"]}
    assert per_image == {im["id"] for im in train["images"]}  # every image holds a new concept
    full = json.loads(files["new"].read_text())
    assert len(full["categories"]) == 35
    old = [a for a in full["annotations"] if a["category_id"] not in new_ids]
    assert old, "the evaluation split annotates the old objects too"
    held = {all_pair_names().index(p) + 1 for p in ("green triangle", "orange star", "purple circle")}
    assert not any(a["category_id"] in held for a in full["annotations"] + train["annotations"])


def test_mean_ap50_skips_pairs_without_boxes() -> None:
    per = {"a": {"AP50": 0.5}, "b": {"AP50": -1.0}, "c": {"AP50": 1.0}}
    assert mean_ap50(per, ["a", "b", "c", "d"]) == pytest.approx(0.75)
    assert np.isnan(mean_ap50(per, ["b"]))


def _dataset(tmp_path: Path) -> Dataset:
    files = write_forgetting_dataset(tmp_path, {"train": 4})
    from gdino.training.datasets import read_dataset

    return read_dataset(files["train"])


def test_pseudo_labels_join_targets_and_cache(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data")
    model = GroundingDinoForObjectDetection.from_pretrained("gdino-shapes")
    classes = seen_pairs()
    cache = tmp_path / "out" / "replay_labels.json"
    wider = pseudo_label(dataset, model, classes, 0.3, cache=cache, base_name="gdino-shapes")
    assert wider.names[: len(dataset.names)] == dataset.names and set(classes) <= set(wider.names)
    added = sum(len(s.labels) for s in wider.samples) - sum(len(s.labels) for s in dataset.samples)
    assert added > 0
    for old, new in zip(dataset.samples, wider.samples):
        np.testing.assert_array_equal(new.boxes[: len(old.boxes)], old.boxes)  # the user's boxes first, unchanged
        assert all(wider.names[k] in classes for k in new.labels[len(old.labels) :])
    saved = json.loads(cache.read_text())
    assert saved["classes"] == classes and saved["base"] == "gdino-shapes"

    def refuse() -> GroundingDinoForObjectDetection:
        raise AssertionError("the cache holds the labels: the base model must not run again")

    again = pseudo_label(dataset, refuse, classes, 0.3, cache=cache, base_name="gdino-shapes")
    assert [s.labels for s in again.samples] == [s.labels for s in wider.samples]


def test_pseudo_boxes_over_user_boxes_are_left_out(tmp_path: Path) -> None:
    sample = Sample(tmp_path / "x.png", 100, 100, np.array([[10, 10, 50, 50]], np.float32), (0,))
    dataset = Dataset((sample,), names=("pink circle",), ids=(1,))
    from gdino.training import replay

    found = [[11, 10, 50, 51, 0, 0.9], [60, 60, 90, 90, 1, 0.8]]
    names = ["pink circle", "red circle", "blue square"]
    out = replay._with_pseudo(sample, found, ["red circle", "blue square"], names, 0.5)
    assert out.labels == (0, 2)  # the "red circle" on the user's pink circle is dropped
    np.testing.assert_array_equal(out.boxes[1], [60, 60, 90, 90])
    assert with_classes(dataset, ["pink circle", "red circle"]).ids == (1, 2)


def test_keep_classes_from_the_checkpoint() -> None:
    assert read_classes("gdino-shapes") == tuple(seen_pairs())
    filled = keep_classes_of(TrainSettings(replay=True), "gdino-shapes")
    assert filled.keep_classes == tuple(seen_pairs())
    assert keep_classes_of(TrainSettings(), "gdino-shapes").keep_classes == ()
    with pytest.raises(TrainError, match="preset"):
        keep_classes_of(TrainSettings(distill=1.0), "config:shapes")
    with pytest.raises(TrainError, match="replay threshold"):
        TrainSettings(replay_threshold=1.5).check()


def test_distillation_terms_vanish_when_student_is_teacher() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8)
    boxes = torch.rand(2, 5, 4) * 0.3 + 0.3
    kept = torch.zeros(2, 8, dtype=torch.bool)
    kept[:, 2:5] = True
    labels = [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}]
    same = distillation_terms(logits, boxes, logits, boxes, kept, labels, box_floor=0.0)
    assert float(same["loss_distill_bbox"]) == pytest.approx(0.0, abs=1e-6)
    assert float(same["loss_distill_giou"]) == pytest.approx(0.0, abs=1e-5)
    moved = distillation_terms(logits + 2.0, boxes + 0.05, logits, boxes, kept, labels, box_floor=0.0)
    assert float(moved["loss_distill_ce"]) > float(same["loss_distill_ce"])  # BCE is least at the teacher
    assert float(moved["loss_distill_bbox"]) > 0.1
    off = torch.zeros_like(kept)
    assert float(distillation_terms(logits + 2.0, boxes, logits, boxes, off, labels)["loss_distill_ce"]) == 0.0


@pytest.mark.slow  # two short fine-tunes of gdino-shapes and six evaluations: about three minutes on 2 cores
def test_replay_forgets_less_than_the_plain_fine_tune(tmp_path: Path) -> None:
    from gdino.training.forgetting import score_forgetting
    from gdino.training.trainer import train

    data = tmp_path / "data"
    write_forgetting_dataset(data, {"train": 60, "new": 30, "val": 30, "held_out": 30}, seed=3)
    common = {"epochs": 2, "batch_size": 2, "lr": 2e-4, "schedule": "cosine", "image_size": 240}
    scores = {}
    for name, extra in (("plain", {}), ("replay", {"replay": True})):
        settings = TrainSettings(**common, augment=False, max_labels=24, denoise=100, **extra)  # type: ignore[arg-type]
        result = train(data / "train.json", "gdino-shapes", tmp_path / name, settings)
        assert result.checkpoint is not None
        model = GroundingDinoForObjectDetection.from_pretrained(result.checkpoint)
        scores[name] = score_forgetting(model, data)
    plain, replay = scores["plain"], scores["replay"]
    assert replay.seen > plain.seen + 0.05, scores
    assert replay.held_out > plain.held_out, scores
