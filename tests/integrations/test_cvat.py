"""``gdino.integrations.cvat`` with the real cvat-sdk and cvat-cli packages, without a CVAT server: cvat-cli's
own ``FunctionLoader`` builds the function from ``-p`` parameters, and cvat-sdk's ``annotate_task`` (its
driver: label mapping, shape validation, upload) runs it on a stand-in task whose frames are local images.
What needs a server (downloading the task's frames, the upload request itself) is replaced by the stand-in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

cvataa = pytest.importorskip(
    "cvat_sdk.auto_annotation", reason="the cvat extra is not installed: pip install 'gdino[cvat]'"
)
from cvat_sdk.auto_annotation import driver
from cvat_sdk.masks import decode_mask

from ellipse_segmenter import EllipseSegmenter
from gdino.integrations import cvat
from gdino.integrations.cvat import GdinoFunction

CLASSES = ["cat", "remote control"]
THRESHOLD = 0.2  # the random-weight test model scores some boxes of chelsea.png above this


class Context(cvataa.DetectionFunctionContext):
    """What the driver passes to ``detect`` (its own context class is private)."""

    def __init__(self, conf_threshold: float | None = None, conv_mask_to_poly: bool = False) -> None:
        self._threshold, self._poly = conf_threshold, conv_mask_to_poly

    @property
    def frame_name(self) -> str:
        return "chelsea.png"

    @property
    def conf_threshold(self) -> float | None:
        return self._threshold

    @property
    def conv_mask_to_poly(self) -> bool:
        return self._poly


class Task:
    """A stand-in for cvat-sdk's ``TaskDataset``: the task's labels and its frames as local images."""

    def __init__(self, labels: list[tuple[str, str]], images: list[Path]) -> None:
        self.labels = [
            SimpleNamespace(name=name, id=100 + i, type=kind, attributes=[], sublabels=[])
            for i, (name, kind) in enumerate(labels)
        ]
        self.samples = [
            SimpleNamespace(frame_index=i, frame_name=p.name, media=SimpleNamespace(load_image=_loader(p)))
            for i, p in enumerate(images)
        ]


def _loader(path: Path) -> Any:
    return lambda: Image.open(path).convert("RGB")


class Client:
    """Records the annotations the driver uploads."""

    def __init__(self) -> None:
        self.uploads: list[Any] = []
        self.logger = SimpleNamespace(info=lambda *a, **k: None)
        self.tasks = SimpleNamespace(api=SimpleNamespace(partial_update_annotations=self._record))

    def _record(self, action: str, task_id: int, patched_labeled_data_request: Any) -> None:
        assert action == "create"
        self.uploads.append(patched_labeled_data_request)


def annotate(monkeypatch, function: Any, task: Task, **options: Any) -> list[Any]:
    """cvat-sdk's ``annotate_task`` on ``task``; the shapes it would upload."""
    monkeypatch.setattr(driver, "TaskDataset", lambda client, task_id, load_annotations: task)
    client = Client()
    cvataa.annotate_task(client, 7, function, **options)  # type: ignore[arg-type]
    assert len(client.uploads) == 1
    return list(client.uploads[0].shapes)


def test_spec_declares_a_label_per_class(fast_model) -> None:
    spec = GdinoFunction(fast_model, CLASSES).spec
    assert isinstance(spec, cvataa.DetectionFunctionSpec)
    assert [(label.name, label.id, label.type) for label in spec.labels] == [
        ("cat", 0, "rectangle"),
        ("remote control", 1, "rectangle"),
    ]
    masked = GdinoFunction(fast_model, CLASSES, EllipseSegmenter()).spec
    assert [label.type for label in masked.labels] == ["mask", "mask"]


def test_driver_uploads_detects_boxes_with_the_tasks_label_ids(monkeypatch, fast_model, data_dir) -> None:
    image = data_dir / "chelsea.png"
    found = fast_model.detect(image, labels=CLASSES, box_threshold=THRESHOLD)
    assert len(found) > 0
    task = Task([("remote control", "rectangle"), ("cat", "any")], [image, image])
    shapes = annotate(monkeypatch, GdinoFunction(fast_model, CLASSES), task, conf_threshold=THRESHOLD)
    assert len(shapes) == 2 * len(found)
    task_ids = {"cat": 101, "remote control": 100}
    for frame in (0, 1):
        ours = [s for s in shapes if s.frame == frame]
        assert [s.type.value for s in ours] == ["rectangle"] * len(found)
        assert [s.label_id for s in ours] == [task_ids[label] for label in found.labels]
        np.testing.assert_allclose([s.points for s in ours], found.boxes, rtol=0, atol=1e-4)
        np.testing.assert_allclose([s.score for s in ours], found.scores, rtol=0, atol=1e-6)
        assert {s.source for s in ours} == {"auto"}


def test_conf_threshold_is_honoured(fast_model, data_dir) -> None:
    image = Image.open(data_dir / "chelsea.png").convert("RGB")
    scores = np.sort(fast_model.detect(image, labels=CLASSES, box_threshold=THRESHOLD).scores)
    cut = float(scores[len(scores) // 2])  # about half the boxes score above it
    function = GdinoFunction(fast_model, CLASSES, threshold=float(scores[-1]))
    low = function.detect(Context(THRESHOLD), image)
    high = function.detect(Context(cut), image)
    assert len(low) == len(scores) > len(high) == int((scores > cut).sum()) > 0
    assert min(s.score for s in high) >= cut
    assert function.detect(Context(None), image) == [], "no conf threshold: the function's own, above every score"


@pytest.mark.slow  # the ellipse masks of every box, at chelsea.png's full size, through the driver twice
def test_masks_are_cvat_masks_or_polygons(monkeypatch, fast_model, data_dir) -> None:
    image = data_dir / "chelsea.png"
    segmenter = EllipseSegmenter()
    found = segmenter.add_masks(image, fast_model.detect(image, labels=CLASSES, box_threshold=THRESHOLD))
    width, height = found.image_size
    function = GdinoFunction(fast_model, CLASSES, segmenter)
    task = Task([("cat", "mask"), ("remote control", "any")], [image])
    shapes = annotate(monkeypatch, function, task, conf_threshold=THRESHOLD)
    nonempty = [i for i in range(len(found)) if found.masks.crops[i].any()]
    assert len(shapes) == len(nonempty) > 0
    for shape, i in zip(shapes, nonempty):
        assert shape.type.value == "mask"
        decoded = decode_mask(shape.points, image_width=width, image_height=height)
        assert np.array_equal(decoded, found.masks.mask(i))
    polygon_task = Task([("cat", "polygon"), ("remote control", "any")], [image])  # CVAT's rule for --conv-mask-to-poly
    polygons = annotate(monkeypatch, function, polygon_task, conf_threshold=THRESHOLD, conv_mask_to_poly=True)
    assert {s.type.value for s in polygons} == {"polygon"}
    assert [s.points for s in polygons] == [p for i in nonempty for p in found.masks.polygons(i)]


def test_a_class_missing_from_the_task_is_cvats_error(monkeypatch, fast_model, data_dir) -> None:
    task = Task([("cat", "rectangle")], [data_dir / "chelsea.png"])
    with pytest.raises(cvataa.BadFunctionError, match="'remote control' is not in dataset"):
        annotate(monkeypatch, GdinoFunction(fast_model, CLASSES), task)
    shapes = annotate(
        monkeypatch, GdinoFunction(fast_model, CLASSES), task, allow_unmatched_labels=True, conf_threshold=THRESHOLD
    )
    assert {s.label_id for s in shapes} == {100}


def test_cvat_cli_loads_the_module_with_its_parameters(monkeypatch, fast_model, fast_dir) -> None:
    common = pytest.importorskip("cvat_cli._internal.common", reason="cvat-cli is not installed")
    parsers = pytest.importorskip("cvat_cli._internal.parsers")
    cvat.load_detector.cache_clear()
    params = dict(parsers.parse_function_parameter(p) for p in ["classes=str:cat, dog", f"model=str:{fast_dir}"])
    params["threshold"] = parsers.parse_function_parameter("threshold=float:0.25")[1]
    function = common.FunctionLoader("gdino.integrations.cvat", None, params).load()
    again = common.FunctionLoader("gdino.integrations.cvat", None, params).load()
    assert [label.name for label in function.spec.labels] == ["cat", "dog"]
    assert function._detector is again._detector, "the model is loaded once"
    assert cvat.load_detector.cache_info().misses == 1
    cvat.load_detector.cache_clear()


@pytest.mark.parametrize(
    ("classes", "message"),
    [("", "no classes given"), (" , ", "no classes given"), ("cat,Cat", "the same label to the model")],
)
def test_bad_classes_are_cvats_error_before_loading(monkeypatch, classes: str, message: str) -> None:
    monkeypatch.setattr(cvat, "load_detector", lambda *a: pytest.fail("loaded a model for bad classes"))
    with pytest.raises(cvataa.BadFunctionError, match=message):
        cvat.create(classes=classes)
