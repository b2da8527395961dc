"""The ONNX export and the torch-free runtime, on the full-size parity checkpoint.

The graphs are traced once (at 352x480, 9 tokens, batch 2) and checked at other sizes: a
non-square image, a 1333-wide one, one phrase and about 250 tokens. onnxruntime's outputs are
compared with our PyTorch fp32 on the 100 best queries, both decoding the image tokens
onnxruntime selected (near-tied proposal scores may swap slots under rounding; see
``outputs.query_index``), and the selections are checked to agree but for such swaps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from gdino.export.onnx import export_onnx
from gdino.models.grounding_dino.model import GroundingDino, TextFeatures
from reference import ROOT

pytestmark = pytest.mark.slow  # a full-size export (minutes) and onnxruntime runs at four sizes

TOP = 100
LONG_LABELS = [f"thing number {i}" for i in range(62)]  # 62 labels of 3 words: about 250 tokens
PROMPTS = ("a cat.", "a cat. a remote control. a sofa with cushions.", ". ".join(LONG_LABELS) + ".")
SIZES = ((320, 512), (512, 320), (416, 416), (224, 1333))  # (H, W) pixels, none the traced size


@pytest.fixture(scope="module")
def export_dir(our_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("onnx")
    export_onnx(our_model, directory)
    return directory


@pytest.fixture(scope="module")
def sessions(export_dir):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return {n: ort.InferenceSession(str(export_dir / f"{n}.onnx"), options) for n in ("text", "image", "detection")}


def test_graphs_pass_the_checker_and_shape_inference(export_dir):
    settings = json.loads((export_dir / "gdino_onnx.json").read_text())
    assert settings["max_text_len"] == 256 and settings["num_queries"] == 900
    assert settings["image"]["shortest_edge"] == 800 and (export_dir / "tokenizer.json").is_file()
    for name in ("text", "image", "detection"):
        path = export_dir / f"{name}.onnx"
        onnx.checker.check_model(str(path))
        inferred = export_dir / f"{name}.inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        model = onnx.load(str(inferred), load_external_data=False)
        inferred.unlink()
        dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
        assert len(dims) >= 2, f"{name}.onnx has no dynamic axes: {dims}"


def _torch_text(model, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> TextFeatures:
    return GroundingDino.text_features(model, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))


def _cases():
    """Every size and every prompt length, each at least once (6 passes, not 4 x 3)."""
    return [(SIZES[0], p) for p in PROMPTS] + [(s, PROMPTS[i % 3]) for i, s in enumerate(SIZES[1:])]


@pytest.mark.parametrize(("size", "prompt"), _cases())
def test_onnxruntime_matches_pytorch(our_model, sessions, size, prompt):
    tokenizer = our_model.processor.tokenizer
    ids, types, mask = tokenizer.encode_arrays([prompt])
    assert prompt != PROMPTS[2] or ids.shape[1] >= 240
    pixels = np.random.default_rng(sum(size)).standard_normal((1, 3, *size), dtype=np.float32)
    text_out = sessions["text"].run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    maps = sessions["image"].run(None, {"pixel_values": pixels})
    feed = {f"level_{i}": m for i, m in enumerate(maps)}
    feed.update({f"mask_{i}": np.ones((1, *m.shape[2:]), dtype=bool) for i, m in enumerate(maps)})
    feed.update(zip(("text_features", "text_padding_mask", "text_self_attention", "text_position_ids"), text_out))
    logits, boxes, index = sessions["detection"].run(None, feed)

    with torch.inference_mode():
        text = _torch_text(our_model, ids, mask, types)
        image = our_model.image_features(torch.from_numpy(pixels))
        for ours, theirs in zip(image.maps, maps):
            assert ours.shape == theirs.shape
            np.testing.assert_allclose(theirs, ours.numpy(), atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(text_out[0], text.features.numpy(), atol=1e-4, rtol=1e-4)
        assert np.array_equal(text_out[2], text.self_attention.numpy())
        assert np.array_equal(text_out[3], text.position_ids.numpy())
        free = our_model.detect_features(image, text)
        forced = our_model.detect_features(image, text, query_index=torch.from_numpy(index))
    shared = len(set(index[0].tolist()) & set(free[2][0].tolist()))
    assert shared >= 0.95 * index.shape[1], f"selections share {shared} of {index.shape[1]} image tokens"
    ref_logits, ref_boxes = forced[0][0].numpy(), forced[1][0].numpy()
    top = np.argsort(-ref_logits.max(-1), kind="stable")[:TOP]
    length = ids.shape[1]
    np.testing.assert_allclose(boxes[0][top], ref_boxes[top], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[0][top, :length], ref_logits[top, :length], atol=1e-3, rtol=0)
    assert np.isneginf(logits[0][:, length:]).all()


def test_image_graph_takes_a_batch(sessions):
    pixels = np.random.default_rng(3).standard_normal((3, 3, 200, 264), dtype=np.float32)
    batch = sessions["image"].run(None, {"pixel_values": pixels})
    alone = sessions["image"].run(None, {"pixel_values": pixels[2:3]})
    for b, a in zip(batch, alone):
        np.testing.assert_allclose(b[2:3], a, atol=1e-4, rtol=1e-4)


_NO_TORCH = """
import importlib.abc, json, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Blocker())
import gdino.runtime.onnx
detector = gdino.runtime.onnx.load(sys.argv[1], threads=2)
out = {}
for key, prompt in (("phrases", "a cat. a remote control."), ("labels", ["cat", "remote control", "st. bernard"])):
    found = detector.detect(sys.argv[2], prompt, box_threshold=0.0, text_threshold=0.0, nms_threshold=0.5)
    out[key] = {"boxes": found.boxes.tolist(), "scores": found.scores.tolist(), "labels": list(found.labels),
                "label_ids": found.label_ids.tolist(), "size": list(found.image_size)}
print(json.dumps(out))
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""


def test_runtime_without_torch_detects_as_pytorch(our_model, export_dir, data_dir):
    image = data_dir / "coffee.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(export_dir), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runtime = json.loads(done.stdout.strip().splitlines()[-1])
    for key, prompt in (("phrases", "a cat. a remote control."), ("labels", ["cat", "remote control", "st. bernard"])):
        ours = our_model.detect(image, prompt, box_threshold=0.0, text_threshold=0.0, nms_threshold=0.5)
        theirs = runtime[key]
        assert tuple(theirs["size"]) == ours.image_size
        # Each of PyTorch's 20 best detections is in the runtime's, with its label and score (a
        # near-tied query selection could swap slots, so they are matched by box, not by rank).
        boxes, scores = np.array(theirs["boxes"]), np.array(theirs["scores"])
        assert len(boxes) > 20
        for box, score, label in zip(ours.boxes[:20], ours.scores[:20], ours.labels[:20]):
            j = int(np.abs(boxes - box).max(-1).argmin())
            assert np.abs(boxes[j] - box).max() < 0.05 and abs(scores[j] - score) < 1e-3
            assert theirs["labels"][j] == label


def test_cli_detect_runs_on_an_export(export_dir, data_dir, capsys):
    from gdino.apps.cli import main

    assert (
        main(
            [
                "detect",
                str(data_dir / "coffee.png"),
                "--prompt",
                "cat,cup",
                "--model",
                str(export_dir),
                "--box-threshold",
                "0.0",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["width"] == 600 and record["detections"]
    assert {d["label"] for d in record["detections"]} <= {"cat", "cup"}


def test_openvino_runtime_detects_as_onnxruntime(export_dir, data_dir):
    """``gdino.runtime.onnx.load(DIR, runtime="openvino")`` compiles the same graphs: the same detections."""
    pytest.importorskip("openvino")
    from gdino.runtime import onnx as runtime

    image = data_dir / "coffee.png"
    reference = runtime.load(export_dir, threads=2)
    compiled = runtime.load(export_dir, threads=2, runtime="openvino")
    assert compiled.runtime == "openvino"
    for prompt in ("a cat. a remote control.", ["cat", "remote control", "st. bernard"]):
        ours = reference.detect(image, prompt, box_threshold=0.0, text_threshold=0.0)
        theirs = compiled.detect(image, prompt, box_threshold=0.0, text_threshold=0.0)
        assert len(theirs.boxes) > 20
        box_diffs, score_diffs = [], []
        for box, score, label in zip(ours.boxes[:20], ours.scores[:20], ours.labels[:20]):
            j = int(np.abs(theirs.boxes - box).max(-1).argmin())  # matched by box: near-tied selections may swap
            assert theirs.labels[j] == label
            box_diffs.append(float(np.abs(theirs.boxes[j] - box).max()))
            score_diffs.append(abs(float(theirs.scores[j] - score)))
        # Loose on purpose: OpenVINO's CPU plugin in its default PERFORMANCE mode (dynamic
        # quantisation of matrix products' activations) is not exact fp32, and this random
        # checkpoint's near-tied queries amplify it: measured here, boxes (600x480 image) differ by a
        # median of about 2 px and at most 13 px. On the trained gdino-shapes export the two agree
        # to 1e-4 (checked by hand; an export of it takes 4 minutes, too long for this suite).
        assert float(np.median(box_diffs)) < 5.0 and max(box_diffs) < 30.0, box_diffs
        assert float(np.median(score_diffs)) < 0.1, score_diffs
    with pytest.raises(ValueError, match="unknown runtime"):
        runtime.load(export_dir, runtime="tensorrt")


def test_cli_runs_an_export_on_openvino_and_refuses_the_runtime_for_a_checkpoint(
    export_dir, small_dir, data_dir, capsys
):
    pytest.importorskip("openvino")
    from gdino.apps.cli import main

    assert (
        main(
            [
                "detect",
                str(data_dir / "coffee.png"),
                "--prompt",
                "cat,cup",
                "--model",
                str(export_dir),
                "--runtime",
                "openvino",
                "--box-threshold",
                "0.0",
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["width"] == 600 and record["detections"]
    assert (
        main(
            [
                "detect",
                str(data_dir / "coffee.png"),
                "--prompt",
                "cat",
                "--model",
                str(small_dir),
                "--runtime",
                "openvino",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "runs ONNX exports" in error


def test_fp16_quantised_export_is_refused_in_one_line_before_loading(tmp_path, capsys):
    from gdino.apps.cli import main

    out = tmp_path / "fp16"
    assert (
        main(
            [
                "export",
                "onnx",
                "--model",
                str(tmp_path / "no-such-model"),
                "--out",
                str(out),
                "--dtype",
                "fp16",
                "--quantize",
                "int8",
            ]
        )
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "fp32 export" in error
    assert not out.exists()


@pytest.fixture(scope="module")
def shapes_fp16_dir(tmp_path_factory) -> Path:
    from gdino.inference.detector import GroundingDinoForObjectDetection

    directory = tmp_path_factory.mktemp("onnx-fp16")
    export_onnx(GroundingDinoForObjectDetection.from_pretrained("gdino-shapes"), directory, dtype="fp16")
    return directory


def test_fp16_export_runs_and_agrees_with_pytorch_fp32(shapes_fp16_dir):
    """The trained shapes model (real, well-separated scores, unlike the random checkpoint's
    near ties) exported with Swin, BERT and the feature enhancer in fp16: half the file size, and
    on the shipped example image the same detections as PyTorch fp32, boxes within 2 px and
    scores within 0.02."""
    from gdino.inference.detector import GroundingDinoForObjectDetection
    from gdino.runtime import onnx as runtime

    settings = json.loads((shapes_fp16_dir / "gdino_onnx.json").read_text())
    assert settings["dtype"] == "fp16"
    graph = onnx.load(str(shapes_fp16_dir / "image.onnx"))
    kinds = {init.data_type for init in graph.graph.initializer if len(init.dims) > 1}
    assert onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds  # Swin's weights in fp16
    onnx.checker.check_model(graph)
    image = ROOT / "examples" / "shapes.png"
    truth = json.loads((image.parent / "shapes.json").read_text())
    names = sorted({c["name"] for c in truth["categories"]})
    reference = GroundingDinoForObjectDetection.from_pretrained("gdino-shapes").detect(
        image, labels=names, box_threshold=0.25
    )
    exported = runtime.load(shapes_fp16_dir, threads=2).detect(image, labels=names, box_threshold=0.25)
    assert len(reference.boxes) >= 4 and exported.labels == reference.labels
    assert float(np.abs(exported.boxes - reference.boxes).max()) < 2.0
    assert float(np.abs(exported.scores - reference.scores).max()) < 0.02
