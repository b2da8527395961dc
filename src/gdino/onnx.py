"""The torch-free runtime: ``gdino.onnx.load(DIR).detect(image, prompt)`` on an ONNX export.

Needs numpy, Pillow, tokenizers and onnxruntime only (``pip install "gdino[onnx]"``); ``DIR`` is
what ``gdino export onnx`` writes (see ``gdino.export.onnx``). ``detect`` takes what the PyTorch
detector's ``detect`` takes and returns the same ``Detections``: the image and prompt rules are
the same modules (``gdino.image``, ``gdino.text``, ``gdino.classes``), label lists are scored
label by label and split into chunks of at most ``max_text_len`` tokens, and each image runs on
its own at its own size.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .detections import Detections
from .processing.classes import ClassPrompt, ClassQuery, TokenSpans, queries_for_images
from .processing.image import ImageLike, ImageSettings, images_to_list, load_image, preprocess_image
from .processing.prompts import TextInput
from .processing.text import TextTokenizer, phrase_names

SETTINGS_FILE = "gdino_onnx.json"


def is_export(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by ``gdino export onnx``."""
    return (Path(path) / SETTINGS_FILE).is_file()


RUNTIMES = ("onnxruntime", "openvino")


def load(
    directory: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    runtime: str = "onnxruntime",
) -> OnnxDetector:
    """Loads an export for ``detect``.

    Args:
        directory: what ``gdino export onnx`` wrote.
        providers: onnxruntime execution providers, e.g. ``["CUDAExecutionProvider"]``; the CPU
            provider by default. Only with ``runtime="onnxruntime"``.
        threads: intra-op threads (the runtime's default: one per physical core).
        runtime: ``"onnxruntime"``, or ``"openvino"`` (``pip install openvino``), which compiles the
            same ``.onnx`` files for the CPU; see bench/README.md for which is faster where.
    """
    return OnnxDetector(directory, providers, threads, runtime)


class _Output:
    """An output's name, as onnxruntime's ``NodeArg`` gives it."""

    def __init__(self, name: str) -> None:
        self.name = name


class OpenVinoSession:
    """One ``.onnx`` graph compiled by OpenVINO for the CPU, with onnxruntime's ``run``/``get_outputs``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import openvino as ov  # only this runtime needs it

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._outputs = [_Output(o.get_any_name()) for o in self.compiled.outputs]
        self._request = self.compiled.create_infer_request()

    def get_outputs(self) -> list[_Output]:
        return self._outputs

    def run(self, names: Sequence[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs named (all, in graph order, for None) on ``feed``, as numpy arrays."""
        results = self._request.infer(feed)
        values = {o.get_any_name(): np.array(results[o]) for o in self.compiled.outputs}
        return [values[n] for n in (names or [o.name for o in self._outputs])]


@dataclass(frozen=True)
class EncodedImages:
    """Per image its level maps (1, D, H_l, W_l), from ``OnnxDetector.encode_image``."""

    maps: list[list[np.ndarray]]
    sizes: list[tuple[int, int]]
    single: bool = False


class OnnxDetector:
    """Grounding DINO on onnxruntime: ``encode_image``, ``detect`` and ``phrases`` as the PyTorch detector."""

    text_cache_size = 64

    device = "cpu"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        runtime: str = "onnxruntime",
    ) -> None:
        root = Path(directory)
        if not is_export(root):
            raise FileNotFoundError(f"{root} holds no ONNX export ({SETTINGS_FILE} is missing); "
                                    "write one with `gdino export onnx --out DIR`")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        if providers and runtime != "onnxruntime":
            raise ValueError("providers are onnxruntime's; OpenVINO runs on the CPU here")
        self.settings = json.loads((root / SETTINGS_FILE).read_text(encoding="utf-8"))
        self.runtime = runtime
        graphs = {name: root / file for name, file in self.settings["graphs"].items()}
        self.sessions = _ort_sessions(graphs, providers, threads) if runtime == "onnxruntime" else {
            name: OpenVinoSession(path, threads) for name, path in graphs.items()
        }
        self.max_text_len = int(self.settings["max_text_len"])
        self.special_token_ids = tuple(self.settings["special_token_ids"])
        self.tokenizer = TextTokenizer.from_tokenizer_json(root / self.settings["tokenizer"], self.max_text_len)
        image = dict(self.settings["image"])
        for key in ("image_mean", "image_std"):
            image[key] = tuple(image[key])
        self.image_settings = ImageSettings(**image)
        # the same attributes as the detector's processor
        self.processor = SimpleNamespace(tokenizer=self.tokenizer, image_settings=self.image_settings)
        self._text_cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    # ---------------------------------------------------------------- image
    def encode_image(self, images: ImageLike | Sequence[ImageLike]) -> EncodedImages:
        """Runs the image graph once per image, for ``detect`` with several prompts."""
        pictures = [load_image(x) for x in images_to_list(images)]
        maps = []
        for picture in pictures:
            pixels = preprocess_image(picture, self.image_settings)[None]  # (1, 3, H, W)
            maps.append(self.sessions["image"].run(None, {"pixel_values": pixels}))
        return EncodedImages(maps, [p.size for p in pictures], not isinstance(images, (list, tuple)))

    # ----------------------------------------------------------------- text
    def text_features(self, text: str) -> dict[str, np.ndarray]:
        """The text graph's outputs for one normalised prompt, by name (cached)."""
        if text in self._text_cache:
            self._text_cache.move_to_end(text)
            return self._text_cache[text]
        ids, types, mask = self.tokenizer.encode_arrays([text])
        session = self.sessions["text"]
        outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        features = dict(zip((o.name for o in session.get_outputs()), outputs))
        self._text_cache[text] = features
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return features

    def detect_features(self, maps: list[np.ndarray], text: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The detection graph on one image's maps: logits (1, Q, max_text_len), boxes (1, Q, 4), query_index (1, Q)."""
        feed = {f"level_{i}": m for i, m in enumerate(maps)}
        feed.update({f"mask_{i}": np.ones((m.shape[0], *m.shape[2:]), dtype=bool) for i, m in enumerate(maps)})
        feed.update(text)
        return self.sessions["detection"].run(None, feed)

    # --------------------------------------------------------------- detect
    def detect(
        self,
        images: ImageLike | Sequence[ImageLike] | EncodedImages,
        prompt: TextInput | None = None,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        *,
        token_spans: TokenSpans | None = None,
        nms_threshold: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> Detections | list[Detections]:
        """Finds the prompt's phrases or labels; arguments and results as the PyTorch ``detect``
        (``labels=[...]``, instead of ``prompt``, is a label list)."""
        encoded = images if isinstance(images, EncodedImages) else self.encode_image(images)
        queries = queries_for_images(prompt, len(encoded.sizes), self.tokenizer, token_spans, labels=labels)
        resolved: list[ClassQuery | tuple[str, list[tuple[int, int]], list[str]]] = [
            q if isinstance(q, ClassQuery) else (q, *phrase_names(q, self.tokenizer, self.special_token_ids))
            for q in queries
        ]
        results = []
        for query, maps, size in zip(resolved, encoded.maps, encoded.sizes):
            if isinstance(query, ClassQuery):
                boxes, scores, ids = self._best_per_query(maps, query.prompts)
                results.append(class_detections(boxes, scores, ids, query.names, size, box_threshold, nms_threshold))
                continue
            text, spans, names = query
            logits, boxes, _ = self.detect_features(maps, self.text_features(text))
            found = phrase_detections(logits[0], boxes[0], spans, names, size, box_threshold, text_threshold)
            results.append(found if nms_threshold is None else nms_detections(found, nms_threshold))
        return results[0] if encoded.single else results

    def phrases(self, prompt: TextInput) -> list[str]:
        """The phrases (or labels) ``detect`` labels boxes with."""
        query = queries_for_images(prompt, 1, self.tokenizer, None)[0]
        return list(query.names) if isinstance(query, ClassQuery) else phrase_names(query, self.tokenizer)[1]

    def _best_per_query(
        self, maps: list[np.ndarray], prompts: Sequence[ClassPrompt]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every query of every chunk with its best label (ties to the earlier): boxes, scores, ids."""
        boxes, scores, ids = [], [], []
        for prompt in prompts:
            logits, chunk_boxes, _ = self.detect_features(maps, self.text_features(prompt.text))
            probs = sigmoid(logits[0])  # (Q, T)
            label_scores = probs @ prompt.positive_weights(probs.shape[-1]).T  # (Q, C)
            best = label_scores.argmax(-1)
            boxes.append(chunk_boxes[0])
            scores.append(label_scores[np.arange(len(best)), best])
            ids.append(np.asarray(prompt.ids, dtype=np.int64)[best])
        return np.concatenate(boxes), np.concatenate(scores), np.concatenate(ids)


# ------------------------------------------------------------------------------ decoding, numpy


def _ort_sessions(graphs: dict[str, Path], providers: Sequence[str] | None, threads: int | None) -> dict[str, Any]:
    """An onnxruntime ``InferenceSession`` per graph (the CPU provider unless ``providers``)."""
    import onnxruntime as ort  # here, so that is_export works without it

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    chosen = list(providers) if providers else ["CPUExecutionProvider"]
    return {name: ort.InferenceSession(str(path), options, providers=chosen) for name, path in graphs.items()}


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic; -inf gives 0."""
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x.astype(np.float32)))).astype(np.float32)


def to_pixels(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) relative (cx, cy, w, h) -> float32 (x0, y0, x1, y1) pixels of a (width, height) image."""
    cx, cy, w, h = boxes.astype(np.float32).T
    width, height = size
    xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    return (xyxy * np.array([width, height, width, height], dtype=np.float32)).astype(np.float32)


def phrase_detections(
    logits: np.ndarray, boxes: np.ndarray, spans: list[tuple[int, int]], names: list[str],
    size: tuple[int, int], box_threshold: float, text_threshold: float,
) -> Detections:  # fmt: skip
    """One image's (Q, T) logits and (Q, 4) boxes -> detections, as the PyTorch ``detect`` decodes a phrase prompt."""
    probs = sigmoid(logits)
    best = probs.max(-1)
    phrase_scores = np.stack([probs[:, s:e].max(-1) for s, e in spans], -1)  # (Q, P)
    phrase = phrase_scores.argmax(-1)
    keep = np.nonzero((best > box_threshold) & (phrase_scores.max(-1) >= text_threshold))[0]
    keep = keep[np.argsort(-best[keep], kind="stable")]
    label_ids = phrase[keep].astype(np.int64)
    return Detections(to_pixels(boxes[keep], size), best[keep].astype(np.float32),
                      tuple(names[i] for i in label_ids), label_ids, size)  # fmt: skip


def class_detections(
    boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, names: tuple[str, ...],
    size: tuple[int, int], box_threshold: float, nms_threshold: float | None,
) -> Detections:  # fmt: skip
    """Candidates with label scores -> thresholded, optionally NMS-ed detections, best first."""
    keep = np.nonzero(scores > box_threshold)[0]
    xyxy, scores, ids = to_pixels(boxes[keep], size), scores[keep], ids[keep]
    order = np.argsort(-scores, kind="stable") if nms_threshold is None else class_nms(xyxy, scores, ids, nms_threshold)
    return Detections(xyxy[order], scores[order].astype(np.float32), tuple(names[i] for i in ids[order]),
                      ids[order].astype(np.int64), size)  # fmt: skip


def nms_detections(found: Detections, nms_threshold: float) -> Detections:
    """``found`` less the boxes overlapping a better box of the same label by more than the threshold."""
    keep = class_nms(found.boxes, found.scores, found.label_ids, nms_threshold)
    return Detections(found.boxes[keep], found.scores[keep], tuple(found.labels[i] for i in keep),
                      found.label_ids[keep], found.image_size)  # fmt: skip


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of xyxy boxes; 0 where the union is empty (as ``gdino.boxes.box_iou``)."""
    area_a = (a[:, 2] - a[:, 0]).clip(min=0) * (a[:, 3] - a[:, 1]).clip(min=0)
    area_b = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    corners = np.minimum(a[:, None, 2:], b[None, :, 2:]) - np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    inter = corners.clip(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, np.finfo(np.float32).tiny), 0.0)


def class_nms(boxes: np.ndarray, scores: np.ndarray, ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS within each label id (as ``gdino.chunking.class_nms``): kept indices, best first."""
    kept = []
    for label in np.unique(ids):
        group = np.nonzero(ids == label)[0]
        order = group[np.argsort(-scores[group], kind="stable")]
        overlaps = np.triu(box_iou(boxes[order], boxes[order]) > iou_threshold, 1)
        dropped = np.zeros(len(order), dtype=bool)
        for i in range(len(order)):
            if not dropped[i]:
                dropped |= overlaps[i]
        kept.append(order[~dropped])
    index = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return index[np.argsort(-scores[index], kind="stable")]
