"""The torch-free runtime: ``gdino.runtime.onnx.load(DIR).detect(image, prompt)`` on an ONNX export.

Needs numpy, Pillow, tokenizers and onnxruntime only (``pip install "gdino[onnx]"``); ``DIR`` is
what ``gdino export onnx`` writes (see ``gdino.export.onnx``). ``detect`` takes what the PyTorch
detector's ``detect`` takes and returns the same ``Detections``: the image and prompt rules are
the same modules (``gdino.processing``), and the loop over images and label chunks and the decode
of raw outputs into ``Detections`` are the PyTorch detector's own (``gdino.inference.pipeline``,
``gdino.inference.postprocess``): each image runs on its own at its own size. An export written
with ``--masks`` also holds segmenter graphs: the loaded detector's ``segmenter``
(``gdino.runtime.onnx_segmenter.OnnxSegmenter``, else None) gives ``Segmenter``'s masks for its boxes.
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

from gdino.inference.detections import Detections
from gdino.inference.pipeline import Query, Thresholds, detect_queries, query_names, resolve_queries
from gdino.processing.classes import TokenSpans
from gdino.processing.image import ImageLike, ImageSettings, images_to_list, load_image, preprocess_image
from gdino.processing.prompts import TextInput
from gdino.processing.text import TextTokenizer
from gdino.runtime.onnx_segmenter import SEGMENTER_GRAPHS, OnnxSegmenter, read_segmenter_settings
from gdino.utils.hub import CheckpointError

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


def load_segmenter(
    directory: str | os.PathLike[str],
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    runtime: str = "onnxruntime",
) -> OnnxSegmenter:
    """Loads an export's segmenter graphs alone (``load(DIR).segmenter`` without the detector's);
    arguments as ``load``.

    Raises:
        CheckpointError: the export has no segmenter graphs (``gdino export onnx --masks MODEL``
            writes them), or they cannot be loaded.
    """
    root = Path(directory)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    segmenter = _segmenter(root, _read_json(root), runtime, providers, threads)
    if segmenter is None:
        raise CheckpointError(
            f"the ONNX export {root} has no segmenter graphs; write them with `gdino export onnx --masks MODEL`"
        )
    return segmenter


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
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
        if providers and runtime != "onnxruntime":
            raise ValueError("providers are onnxruntime's; OpenVINO runs on the CPU here")
        self.settings = read_settings(root)
        self.runtime = runtime
        self.max_text_len = int(self.settings["max_text_len"])
        self.special_token_ids = tuple(self.settings["special_token_ids"])
        self.tokenizer = _tokenizer(root / self.settings["tokenizer"], self.max_text_len)
        self.image_settings = _image_settings(root / SETTINGS_FILE, self.settings["image"])
        graphs = {name: root / file for name, file in self.settings["graphs"].items()}
        self.sessions = _sessions(graphs, runtime, providers, threads)
        # the export's segmenter graphs (``gdino export onnx --masks``), for --masks; None without them
        self.segmenter = _segmenter(root, self.settings, runtime, providers, threads)
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

    def run_text(self, image: list[np.ndarray], text: str) -> tuple[np.ndarray, np.ndarray]:
        """The pipeline's backend (``gdino.inference.pipeline.Backend``): one image's maps and a
        normalised prompt -> (Q, T) token logits and (Q, 4) relative boxes, float32."""
        logits, boxes, _ = self.detect_features(image, self.text_features(text))
        return np.asarray(logits[0], dtype=np.float32), np.asarray(boxes[0], dtype=np.float32)

    # --------------------------------------------------------------- detect
    def detect(
        self,
        images: ImageLike | Sequence[ImageLike] | EncodedImages,
        prompt: TextInput | None = None,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        *,
        token_spans: TokenSpans | None = None,
        nms_threshold: float | None = None,
        labels: Sequence[str] | None = None,
        prompts: Sequence[str | Sequence[str]] | None = None,
    ) -> Detections | list[Detections]:
        """Finds the prompt's phrases or labels; arguments and results as the PyTorch ``detect``
        (the same loop, ``gdino.inference.pipeline.detect_queries``)."""
        defaults: dict[str, float] = {
            k: float(self.settings[k]) for k in ("box_threshold", "text_threshold") if k in self.settings
        }
        thresholds = Thresholds.chosen(box_threshold, text_threshold, nms_threshold, defaults)
        n_images = len(images.sizes) if isinstance(images, EncodedImages) else len(images_to_list(images))
        queries = self._queries(prompt, n_images, token_spans, labels, prompts)  # before any image work
        encoded = images if isinstance(images, EncodedImages) else self.encode_image(images)
        results = detect_queries(self, encoded.maps, queries, encoded.sizes, thresholds)
        return results[0] if encoded.single else results

    def phrases(self, prompt: TextInput | None = None, *, labels: Sequence[str] | None = None) -> list[str]:
        """The phrases (or labels) ``detect`` labels boxes with."""
        return query_names(self._queries(prompt, 1, None, labels)[0])

    def _queries(
        self,
        prompt: TextInput | None,
        n_images: int,
        token_spans: TokenSpans | None,
        labels: Sequence[str] | None = None,
        prompts: Sequence[str | Sequence[str]] | None = None,
    ) -> list[Query]:
        return resolve_queries(
            prompt, n_images, self.tokenizer, self.special_token_ids, token_spans, labels=labels, prompts=prompts
        )


# ------------------------------------------------------------------------------ loading

# What gdino_onnx.json must hold to be run, with the type of each value.
_SETTINGS_TYPES: dict[str, tuple[type, str]] = {
    "graphs": (dict, "an object"),
    "max_text_len": (int, "a whole number"),
    "special_token_ids": (list, "a list"),
    "tokenizer": (str, "a file name"),
    "image": (dict, "an object"),
}
GRAPHS = ("text", "image", "detection")


def read_settings(root: Path) -> dict[str, Any]:
    """``gdino_onnx.json`` of an export, checked for what the runtime reads.

    Raises:
        CheckpointError: the file is missing, not JSON, or lacks a field or holds one of another type
            (the message names the file and the field).
    """
    path = root / SETTINGS_FILE
    settings = _read_json(root)
    for key, (kind, what) in _SETTINGS_TYPES.items():
        if key not in settings:
            raise CheckpointError(f"{path} has no {key!r}; export again with `gdino export onnx`")
        if not isinstance(settings[key], kind) or isinstance(settings[key], bool):
            raise CheckpointError(f"{path}: {key!r} must be {what}, got {settings[key]!r}")
    missing = [g for g in GRAPHS if not isinstance(settings["graphs"].get(g), str)]
    if missing:
        raise CheckpointError(f"{path}: 'graphs' names no file for the {', '.join(missing)} graph")
    return settings


def _segmenter(
    root: Path, settings: dict[str, Any], runtime: str, providers: Sequence[str] | None, threads: int | None
) -> OnnxSegmenter | None:
    """The export's ``OnnxSegmenter``, or None when it has no segmenter graphs.

    Raises:
        CheckpointError: its settings are broken, or a graph is missing or cannot be loaded.
    """
    entry = read_segmenter_settings(root / SETTINGS_FILE, settings)
    if entry is None:
        return None
    graphs = {f"segmenter {name}": root / entry["graphs"][name] for name in SEGMENTER_GRAPHS}  # named in messages
    sessions = _sessions(graphs, runtime, providers, threads)
    by_name = {name: sessions[f"segmenter {name}"] for name in SEGMENTER_GRAPHS}
    return OnnxSegmenter(by_name, entry, root / SETTINGS_FILE)


def _read_json(root: Path) -> dict[str, Any]:
    """``gdino_onnx.json`` of an export as a JSON object.

    Raises:
        CheckpointError: the file is missing, not JSON, or not an object.
    """
    path = root / SETTINGS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{root} is not an ONNX export: {SETTINGS_FILE} is missing; write one with `gdino export onnx --out DIR`"
        )
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(settings).__name__}")
    return settings


def _tokenizer(path: Path, max_text_len: int) -> TextTokenizer:
    try:
        return TextTokenizer.from_tokenizer_json(path, max_text_len)
    except Exception as e:  # noqa: BLE001 (the tokenizers library raises a bare Exception for a bad file)
        raise CheckpointError(f"{path} cannot be read as the export's tokenizer: {e}") from None


def _image_settings(path: Path, values: dict[str, Any]) -> ImageSettings:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return ImageSettings(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: 'image' holds settings the runtime cannot use: {e}") from None


def _sessions(
    graphs: dict[str, Path], runtime: str, providers: Sequence[str] | None, threads: int | None
) -> dict[str, Any]:
    """A session per graph on ``runtime``.

    Raises:
        CheckpointError: the runtime is not installed, or a graph file is missing, truncated or corrupt.
    """
    package = "onnxruntime" if runtime == "onnxruntime" else "openvino"
    extra = "onnx" if runtime == "onnxruntime" else "openvino"
    sessions = {}
    for name, path in graphs.items():
        if not path.is_file():
            raise CheckpointError(f"the export's {name} graph {path} is missing")
        try:
            sessions[name] = (
                _ort_session(path, providers, threads) if runtime == "onnxruntime" else (OpenVinoSession(path, threads))
            )
        except ImportError:
            raise CheckpointError(
                f"--runtime {runtime} needs {package}, which is not installed: pip install 'gdino[{extra}]'"
            ) from None
        except Exception as e:  # noqa: BLE001 (onnxruntime and OpenVINO raise their own types for a bad file)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path} cannot be loaded by {package} (truncated or corrupt?): {first}") from None
    return sessions


def _ort_session(path: Path, providers: Sequence[str] | None, threads: int | None) -> Any:
    """An onnxruntime ``InferenceSession`` (the CPU provider unless ``providers``)."""
    import onnxruntime as ort  # here, so that is_export works without it

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    chosen = list(providers) if providers else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=chosen)
