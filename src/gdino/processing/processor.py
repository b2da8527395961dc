"""``GroundingDinoProcessor``: images + prompt -> model inputs, and raw outputs -> detections.

Drop-in for ``transformers.GroundingDinoProcessor`` (same call, same output keys and values,
same ``post_process_grounded_object_detection``), built on ``tokenizers``, PIL and numpy only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gdino.processing.image import (
    ImageError,
    ImageLike,
    ImageSettings,
    images_to_list,
    load_image,
    pad_batch,
    preprocess_image,
)
from gdino.processing.prompts import TextInput, processor_prompts, prompts_for_images
from gdino.processing.text import PromptError, TextTokenizer, as_id_list, phrase_spans, read_tokenizer_config
from gdino.utils.boxes import cxcywh_to_xyxy, to_pixels
from gdino.utils.checks import check_fraction
from gdino.utils.hub import DEFAULT_MODEL_ID, resolve

__all__ = [
    "BatchEncoding",
    "GroundingDinoProcessor",
    "ImageError",
    "ProcessorFiles",
    "PromptError",
    "grounded_detections",
    "resolve_files",
]

_HUB_KWARGS = frozenset({"revision", "cache_dir", "token", "local_files_only", "force_download"})


class BatchEncoding(dict):
    """The processor's output: a dict (so ``model(**inputs)`` works) with attribute access.

    Keys: ``input_ids``, ``token_type_ids``, ``attention_mask`` ``(B, L)`` int64 and
    ``pixel_mask`` ``(B, H, W)`` int64, ``pixel_values`` ``(B, 3, H, W)`` float32.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {list(self)}") from None

    def to(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        """Moves all tensors to a device; a dtype argument casts only the floating-point ones.

        Accepts what ``torch.Tensor.to`` does (``"cuda"``, ``torch.float16``, ``device=..``).
        Changes this object in place and returns it, like the Hugging Face ``BatchFeature``.
        """
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast, **kwargs)
        return self


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ProcessorFiles:
    """The processor files found in a model directory (``None`` where absent)."""

    tokenizer_json: Path | None = None
    vocab: Path | None = None
    tokenizer_config: Path | None = None
    preprocessor_config: Path | None = None
    model_config: Path | None = None


def resolve_files(directory: str | os.PathLike) -> ProcessorFiles:
    """Finds the processor files in a local model directory.

    Looks for ``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json``,
    ``preprocessor_config.json`` (else ``processor_config.json``) and ``config.json``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")

    def find(*names: str) -> Path | None:
        return next((root / n for n in names if (root / n).is_file()), None)

    return ProcessorFiles(
        tokenizer_json=find("tokenizer.json"),
        vocab=find("vocab.txt"),
        tokenizer_config=find("tokenizer_config.json"),
        preprocessor_config=find("preprocessor_config.json", "processor_config.json"),
        model_config=find("config.json"),
    )


def _resolve(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> Path | None:
    """The directory holding the processor files for a hub id, directory or checkpoint file.

    Resolved exactly as the model's weights are (``gdino.utils.hub.resolve``: hub cache, download,
    local directory). An original ``.pth`` alone has no processor files: None, meaning defaults.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():  # a processor-only directory (no weights) is fine here
        return path
    return resolve(path_or_id, **hub_kwargs).directory


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _image_settings(path: Path | None) -> ImageSettings:
    cfg = _read_json(path)
    return ImageSettings.from_hf_dict(cfg.get("image_processor", cfg))


# --------------------------------------------------------------------------- post-processing


def _sizes(target_sizes: torch.Tensor | Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(height, width)`` -> heights and widths, each ``(B, 1)``."""
    sizes = torch.as_tensor(target_sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must be (height, width) per image, shape (B, 2); got {tuple(sizes.shape)}")
    return sizes[:, :1], sizes[:, 1:]


def grounded_detections(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    input_ids: torch.Tensor,
    box_threshold: float = 0.25,
    text_threshold: float = 0.25,
    target_sizes: torch.Tensor | Sequence[Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """Thresholded boxes with the prompt tokens each one matched, per image.

    Args:
        logits: ``(B, Q, T)`` box-token logits (``T`` = 256, -inf past the text).
        pred_boxes: ``(B, Q, 4)`` boxes, (cx, cy, w, h) relative to the image.
        input_ids: ``(B, L)`` prompt token ids.
        box_threshold: keep boxes whose best token probability is ``> box_threshold``.
        text_threshold: a kept box's tokens with probability ``> text_threshold`` form its label.
        target_sizes: ``(B, 2)`` (height, width) per image for pixel boxes; relative if ``None``.

    Returns:
        Per image: ``scores`` ``(N,)``, ``boxes`` ``(N, 4)`` (x0, y0, x1, y1) and ``token_ids``,
        a list of ``N`` lists of matched token ids (position 0 and ``T - 1`` excluded, as in HF).
    """
    if logits.ndim != 3 or pred_boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"expected logits (B, Q, T) and pred_boxes (B, Q, 4); got {tuple(logits.shape)} "
            f"and {tuple(pred_boxes.shape)}"
        )
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"input_ids must be (B, L) with B = {logits.shape[0]}; got {tuple(input_ids.shape)}")
    if target_sizes is not None and len(target_sizes) != len(logits):
        raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)} images")
    probs = torch.sigmoid(logits)
    scores = probs.max(dim=-1).values
    if target_sizes is None:
        boxes = cxcywh_to_xyxy(pred_boxes)
    else:
        heights, widths = _sizes(target_sizes)
        boxes = to_pixels(pred_boxes, widths, heights)
    results = []
    for b in range(len(logits)):
        keep = scores[b] > box_threshold
        posmap = probs[b][keep] > text_threshold
        posmap[:, 0] = False
        posmap[:, -1] = False
        posmap = posmap[:, : input_ids.shape[1]]  # positions past the text hold no token
        ids = input_ids[b].tolist()
        token_ids = [[ids[i] for i in row.nonzero().flatten().tolist()] for row in posmap]
        results.append({"scores": scores[b][keep], "boxes": boxes[b][keep], "token_ids": token_ids})
    return results


# --------------------------------------------------------------------------- processor


class GroundingDinoProcessor:
    """Prepares images and prompts for Grounding DINO and decodes its raw outputs.

    Args:
        tokenizer: BERT tokenizer; the packaged BERT-base-uncased one if ``None``.
        image_settings: resize/normalise parameters; the published ones if ``None``.
    """

    def __init__(self, tokenizer: TextTokenizer | None = None, image_settings: ImageSettings | None = None) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else TextTokenizer.from_vocab()
        self.image_settings = image_settings if image_settings is not None else ImageSettings()

    @classmethod
    def default(cls, max_text_len: int = 256) -> GroundingDinoProcessor:
        """The grounding-dino-tiny processor from the packaged vocabulary; needs no files."""
        return cls(TextTokenizer.from_vocab(max_text_len=max_text_len), ImageSettings())

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = DEFAULT_MODEL_ID, **kwargs: Any) -> GroundingDinoProcessor:
        """Loads the processor of a hub id, a model directory or a checkpoint file.

        Uses ``tokenizer.json`` if present, else ``vocab.txt``, else the packaged vocabulary;
        ``preprocessor_config.json`` / ``processor_config.json`` for the image settings and
        ``config.json``'s ``max_text_len``. An original ``.pth`` alone gives the defaults.

        Args:
            path_or_id: a hub id, a local directory or a checkpoint file.
            **kwargs: ``max_text_len`` to override the limit; the hub options ``revision``,
                ``cache_dir``, ``token``, ``local_files_only``, ``force_download`` (as in
                ``huggingface_hub.snapshot_download``; ignored for local paths).

        Raises:
            TypeError: any other keyword argument.
        """
        max_text_len = kwargs.pop("max_text_len", None)
        unknown = set(kwargs) - _HUB_KWARGS
        if unknown:
            raise TypeError(f"from_pretrained got unexpected arguments {sorted(unknown)}")
        directory = _resolve(path_or_id, **kwargs)
        if directory is None:
            return cls.default(max_text_len or 256)
        files = resolve_files(directory)
        if max_text_len is None:
            max_text_len = int(_read_json(files.model_config).get("max_text_len", 256))
        if files.tokenizer_json is not None:
            tokenizer = TextTokenizer.from_tokenizer_json(files.tokenizer_json, max_text_len)
        else:
            options = read_tokenizer_config(files.tokenizer_config)
            tokenizer = TextTokenizer.from_vocab(files.vocab, max_text_len, **options)
        return cls(tokenizer, _image_settings(files.preprocessor_config))

    # ----------------------------------------------------------------------- inputs

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        text: TextInput | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        *,
        labels: Sequence[str] | None = None,
    ) -> BatchEncoding:
        """Turns images and a prompt into model inputs.

        Args:
            images: one image or a list (PIL image, uint8 numpy ``(H, W[, 3|4])``, file path).
            text: read as transformers reads it (``gdino.processing.prompts.processor_prompts``): a prompt
                (``"a cat. a remote control."``), a list of labels (``["cat", "remote control"]``,
                no string holding ``"."``), or a list of those, one per image. One prompt is
                used for every image. Lower-cased, and given a final ``"."`` if it lacks one.
            return_tensors: ``"pt"`` (torch tensors) or ``"np"`` (numpy arrays).
            padding: accepted for compatibility; prompts are always padded to the longest.
            labels: instead of ``text``, a label list for every image, whatever its labels hold:
                ``labels=["st. bernard"]`` is the label "st bernard", not two phrases.

        Returns:
            A :class:`BatchEncoding` with ``input_ids``, ``token_type_ids``, ``attention_mask``
            ``(B, L)`` int64 (if ``text``) and ``pixel_mask`` ``(B, H, W)`` int64,
            ``pixel_values`` ``(B, 3, H, W)`` float32 (if ``images``).

        Raises:
            ImageError: an image cannot be read or converted.
            PromptError: empty prompt, prompt over ``max_text_len`` tokens, or a number of
                prompts that does not match the number of images.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if padding not in (True, "longest"):
            raise ValueError(f"only padding to the longest prompt is supported, got padding={padding!r}")
        if images is None and text is None and labels is None:
            raise ValueError("give images, text or both")
        out = BatchEncoding()
        image_list = None if images is None else images_to_list(images)
        if text is not None or labels is not None:
            prompts = processor_prompts(text, labels)
            if image_list is not None:
                prompts = prompts_for_images(prompts, len(image_list))
            tokens = self.tokenizer.encode(prompts)
            out.update(
                input_ids=tokens.input_ids, token_type_ids=tokens.token_type_ids, attention_mask=tokens.attention_mask
            )
        if image_list is not None:
            pixel_values, pixel_mask = self.preprocess_images(image_list)
            out.update(pixel_mask=torch.from_numpy(pixel_mask), pixel_values=torch.from_numpy(pixel_values))
        if return_tensors == "np":
            for key, value in out.items():
                out[key] = value.numpy()
        return out

    def preprocess_images(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Loads, resizes, normalises and pads images.

        Returns:
            ``pixel_values`` ``(B, 3, H, W)`` float32 and ``pixel_mask`` ``(B, H, W)`` int64.
        """
        arrays = []
        for i, image in enumerate(images):
            try:
                rgb = load_image(image)
            except ImageError as exc:
                if len(images) == 1:
                    raise
                raise ImageError(f"image {i}: {exc}") from exc
            arrays.append(preprocess_image(rgb, self.image_settings))
        return pad_batch(arrays)

    # ----------------------------------------------------------------------- outputs

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Token ids -> text (special tokens kept unless ``skip_special_tokens``)."""
        return self.tokenizer.decode(as_id_list(token_ids), skip_special_tokens)

    def batch_decode(
        self, batch: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        """Decodes each row of ``batch``; see :meth:`decode`."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def phrase_texts(self, input_ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The phrases of one tokenised prompt, in order: ``"a cat. dog."`` -> ``["a cat", "dog"]``.

        Indices match :func:`gdino.processing.text.phrase_spans` of the same ``(L,)`` ids.
        """
        ids = as_id_list(input_ids)
        return [self.tokenizer.decode(ids[s:e]) for s, e in phrase_spans(ids, pad_token_id=self.tokenizer.pad_token_id)]

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        input_ids: torch.Tensor | None = None,
        threshold: float | None = None,
        text_threshold: float = 0.25,
        target_sizes: torch.Tensor | Sequence[Sequence[float]] | None = None,
        text_labels: Sequence[Sequence[str]] | None = None,
        *,
        box_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Raw model outputs -> boxes, scores and text labels, exactly as transformers does.

        Args:
            outputs: has ``logits`` ``(B, Q, 256)`` and ``pred_boxes`` ``(B, Q, 4)`` (cx, cy,
                w, h relative), and ``input_ids`` if the argument is not given.
            input_ids: ``(B, L)`` prompt token ids; ``outputs.input_ids`` if ``None``.
            threshold: box score threshold (default 0.25); ``box_threshold`` is another name.
            text_threshold: token probability threshold for the label text.
            target_sizes: ``(B, 2)`` (height, width) per image; boxes stay relative if ``None``.
            text_labels: accepted for pipeline compatibility and ignored, as in transformers.

        Returns:
            Per image a dict: ``scores`` ``(N,)``, ``boxes`` ``(N, 4)`` (x0, y0, x1, y1),
            ``text_labels`` (N strings: the matched tokens decoded) and ``labels`` (the same).

        Raises:
            ValueError: a threshold that is not a finite number in [0, 1] (``gdino.utils.checks``).
        """
        del text_labels
        if threshold is not None and box_threshold is not None and threshold != box_threshold:
            raise ValueError(f"threshold={threshold} and box_threshold={box_threshold} disagree; give one")
        name = "threshold" if threshold is not None or box_threshold is None else "box_threshold"
        threshold = check_fraction(next((t for t in (threshold, box_threshold) if t is not None), 0.25), name)
        text_threshold = check_fraction(text_threshold, "text_threshold")
        logits, pred_boxes = _field(outputs, "logits"), _field(outputs, "pred_boxes")
        if logits is None or pred_boxes is None:
            raise ValueError("outputs must have logits and pred_boxes (the detector's raw outputs)")
        input_ids = input_ids if input_ids is not None else _field(outputs, "input_ids")
        if input_ids is None:
            raise ValueError("outputs carries no input_ids; pass input_ids=inputs['input_ids']")
        results = []
        for det in grounded_detections(logits, pred_boxes, input_ids, threshold, text_threshold, target_sizes):
            labels = self.tokenizer.batch_decode(det["token_ids"])
            results.append(
                {"scores": det["scores"], "boxes": det["boxes"], "text_labels": labels, "labels": list(labels)}
            )
        return results


def _field(outputs: Any, name: str) -> Any:
    """``outputs.name`` or ``outputs[name]`` (model outputs may be objects or dicts), else None."""
    return outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
