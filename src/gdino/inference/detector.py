"""The one-call API: ``GroundingDinoForObjectDetection.from_pretrained(...).detect(image, prompt)``.

The class is the model (``model(**inputs)`` returns logits and boxes as transformers' does) plus
loading and a processor, so the model card's snippet runs with only its import line changed. It
also runs a label list's chunks (``score_label_chunks``, one encoder and decoder pass each, which
``on_chunk`` callbacks follow). ``detect`` is the shared loop of ``gdino.inference.pipeline`` over
this model's ``run_text``, decoded by ``gdino.inference.postprocess`` into ``Detections``, as the
torch-free ONNX runtime's is.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from gdino.checkpoint.loading import load_model
from gdino.inference.detections import Detections
from gdino.inference.pipeline import (
    ChunkCallback,
    Query,
    Thresholds,
    detect_queries,
    label_chunks,
    query_names,
    resolve_queries,
)
from gdino.inference.postprocess import ChunkScores
from gdino.inference.tiled import detect_batched, detect_tiled
from gdino.inference.tiled_masks import add_region_masks
from gdino.inference.tiles import TileSettings
from gdino.models.grounding_dino.model import (
    GroundingDino,
    GroundingDinoOutput,
    ImageFeatures,
    TextFeatures,
    stack_images,
)
from gdino.processing.classes import ClassPrompt, ClassQuery, TokenSpans
from gdino.processing.image import ImageLike, images_to_list, load_image
from gdino.processing.processor import GroundingDinoProcessor
from gdino.processing.prompts import TextInput
from gdino.utils.hub import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from gdino.inference.segmenter import Segmenter
    from gdino.loss.denoise import DenoiseSettings, Denoising
    from gdino.models.grounding_dino.features import DenoisingQueries

log = logging.getLogger(__name__)

MANY_CHUNKS = 8  # from this many passes per image on, ``detect`` warns of the cost
_on_chunk: ContextVar[ChunkCallback | None] = ContextVar("gdino_on_chunk", default=None)


@contextmanager
def on_chunk(callback: ChunkCallback) -> Iterator[None]:
    """Calls ``callback(done, total)`` before each chunk of a label list and once after the last.

    It holds in this thread (or task) only. For progress (the command line) and for stopping
    between chunks (the server): an exception raised by the callback ends ``detect`` before the
    next pass.
    """
    token = _on_chunk.set(callback)
    try:
        yield
    finally:
        _on_chunk.reset(token)


@lru_cache(maxsize=64)
def _warn_cost(chunks: int, labels: int) -> None:
    """Says once per list size what a huge label list costs."""
    log.warning(
        "%d labels need %d passes of the encoder and decoder per image (each up to 256 tokens); "
        "a shorter list is faster",
        labels,
        chunks,
    )


@dataclass(frozen=True)
class EncodedImages:
    """Images with their text-independent features computed, for several prompts (``encode_image``).

    Attributes:
        features: Swin and input-projection features of the batch.
        sizes: (width, height) of each original image.
        single: whether one image (not a list) was given.
    """

    features: ImageFeatures
    sizes: list[tuple[int, int]]
    single: bool = field(default=False)


class GroundingDinoForObjectDetection(GroundingDino):
    """Grounding DINO with loading, a processor, ``encode_image`` and ``detect``.

    Prompts already seen are not re-encoded: BERT's output for each distinct prompt is kept in a
    small cache (``text_cache_size`` entries) while gradients are off. New text-side weights empty
    it (see ``_text_cache``), and so does every ``train()`` / ``eval()``; a loop that steps a fused
    optimizer (``torch.optim.AdamW(..., fused=True)``, whose kernels leave the weights' version
    counters alone) without switching modes calls ``clear_text_cache()``.
    """

    processor: GroundingDinoProcessor
    text_cache_size: int = 64

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        box_refinement: str | None = None,
    ) -> GroundingDinoForObjectDetection:
        """Loads a hub id, a local Hugging Face directory or an original ``.pth`` checkpoint.

        Args:
            model: the hub id, directory or file.
            dtype: e.g. ``torch.bfloat16`` (or ``"bfloat16"``); ``None`` or ``"auto"`` keeps the
                weights as stored. ``torch_dtype`` is another name for it, as in transformers.
            device: where to put the model.
            cache_dir, revision, token, local_files_only, force_download: for a hub id, as in
                ``huggingface_hub.snapshot_download``; local paths ignore them.
            box_refinement: "original" (the original code's reference-box logit, eps 1e-3)
                or "transformers" (eps 1e-5); by default "original" for an original ``.pth``
                and "transformers" for the Hugging Face layout (README, "Box refinement").

        Raises:
            TypeError: an argument this method does not take (e.g. ``device_map``).
            ValueError: ``dtype`` and ``torch_dtype`` both given and different, or not a dtype.
            CheckpointError: the checkpoint cannot be found or does not fit the model.
        """
        dtype = dtype_argument(dtype, torch_dtype)
        net, checkpoint = load_model(
            model,
            dtype=dtype,
            device=device,
            cache_dir=cache_dir,
            model_class=cls,
            revision=revision,
            token=token,
            local_files_only=local_files_only,
            force_download=force_download,
            box_refinement=box_refinement,
        )
        assert isinstance(net, cls)
        if checkpoint.directory is not None:
            net.processor = GroundingDinoProcessor.from_pretrained(checkpoint.directory)
        else:
            net.processor = GroundingDinoProcessor.default(net.config.max_text_len)
        return net

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        intermediate: bool = False,
        denoise: DenoisingQueries | None = None,
        labels: Sequence[dict[str, torch.Tensor]] | None = None,
        denoising: DenoiseSettings | None = None,
    ) -> GroundingDinoOutput:
        """``model(**inputs)``, and with ``labels`` also ``outputs.loss`` and ``outputs.loss_dict``.

        ``labels`` follow transformers: per image ``{"class_labels": (N,) int64 indices of the
        prompt's phrases, "boxes": (N, 4) float (cx, cy, w, h) normalised to the image}``; see
        ``gdino.loss.criterion`` for the terms, their keys and weights. Without labels nothing
        beyond the detections is computed. ``denoising`` (with ``labels``) adds DINO's
        contrastive denoising queries and their ``*_dn`` loss terms (``gdino.loss.denoise``);
        transformers has no such option, so its loss is matched only without it. ``denoise``
        passes ready-made denoising queries (``GroundingDino.forward``); ``denoising`` makes them.
        """
        dn = None
        if labels is not None and denoising is not None:
            from gdino.loss.denoise import make_denoising

            dn = make_denoising(input_ids, labels, self.config, denoising)
        outputs = super().forward(
            pixel_values,
            input_ids,
            attention_mask,
            token_type_ids,
            pixel_mask,
            query_index,
            intermediate=intermediate or labels is not None,
            denoise=denoise if dn is None else dn.queries,
        )
        if labels is None:
            return outputs
        return self.with_loss(outputs, input_ids, attention_mask, labels, dn)

    def with_loss(
        self,
        outputs: GroundingDinoOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: Sequence[dict[str, torch.Tensor]],
        dn: Denoising | None = None,
    ) -> GroundingDinoOutput:
        """``outputs`` (with every layer's predictions) with ``loss`` and ``loss_dict`` set: the
        grounding loss of ``labels``, and with ``dn`` (``make_denoising``'s) its denoising terms."""
        from gdino.loss.criterion import grounding_loss  # training code is loaded only to train

        outputs.loss, outputs.loss_dict = grounding_loss(outputs, input_ids, attention_mask, labels, self.config)
        if dn is not None:
            from gdino.loss.denoise import denoising_loss

            extra, terms = denoising_loss(outputs, input_ids, attention_mask, dn, self.config)
            outputs.loss = outputs.loss + extra
            outputs.loss_dict.update(terms)
        return outputs

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def detect(
        self,
        images: ImageLike | Sequence[ImageLike] | EncodedImages,
        prompt: TextInput | None = None,
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        *,
        labels: Sequence[str] | None = None,
        prompts: Sequence[str | Sequence[str]] | None = None,
        token_spans: TokenSpans | None = None,
        nms_threshold: float | None = None,
        tiles: TileSettings | None = None,
        batch_size: int = 1,
        segmenter: Segmenter | None = None,
    ) -> Detections | list[Detections]:
        """Finds the prompt's phrases, or the labels of a label list, in one image or a list of images.

        What the text means follows one rule (``gdino.processing.prompts``), by type only: a string is a
        phrase prompt, a list of strings is one label list for every image, a list of lists one
        label list per image. A string prompt is scored phrase by phrase: a box's score is its
        best token's. A label list (any length: over 256 tokens it is run in chunks on the same
        image features) and ``token_spans`` are scored label by label (``gdino.processing.classes``): a
        box's label is the one whose tokens' mean probability is highest, its score is that
        mean, and ``label_ids`` index the list. Everything is checked before any image is read.

        Args:
            images: a PIL image, a uint8 numpy array (H, W, 3) or a file path; or a list of them;
                or ``encode_image``'s output.
            prompt: "a cat. a remote control.", or a list of labels ["cat", "remote control"].
            box_threshold: keep a box when its score is above this (a number in [0, 1]); by
                default the model's (``config.box_threshold``: 0.35 for the published models,
                what a model's config.json recommends under "gdino_defaults" otherwise).
            text_threshold: phrase prompts only: keep a box only when its phrase scores at least
                this (a number in [0, 1]); by default the model's (``config.text_threshold``).
            labels: instead of ``prompt``, a label list, e.g. ``labels=["st. bernard", "cat"]``.
            prompts: instead of ``prompt``, one prompt per image, each a string or a label list.
            token_spans: labels as character spans of a string prompt, e.g. for "the man in a red
                hat", ``[[(0, 7)], [(11, 20)]]`` gives the labels "the man" and "a red hat".
            nms_threshold: if given, drop a box overlapping a better box of the same label by an
                IoU above this (a number in [0, 1]).
            tiles: detect on overlapping tiles of each image (and the whole image), merged as SAHI
                merges (``gdino.inference.tiled``), for small objects in large images.
            batch_size: with ``tiles``, the tiles that go through the model together; without, the
                images of one size that do (``gdino.inference.tiled.detect_batched``). 1, the default,
                runs each image alone: its detections then never depend on the rest of the batch.
            segmenter: a ``gdino.inference.segmenter.Segmenter``: each detection also gets a mask
                (``masks``, ``mask_scores``), every box of an image decoded against one encoding;
                with ``tiles``, each box on the tile that holds it (``gdino.inference.tiled_masks``).

        Returns:
            ``Detections`` for one image, a list of them for a list.

        Raises:
            ValueError: a threshold that is not a finite number in [0, 1].
            PromptError: an empty, malformed or over-long prompt, duplicate labels, or a number of
                prompts that does not match the images.
            ImageError: an image that cannot be read.
        """
        thresholds = Thresholds.chosen(box_threshold, text_threshold, nms_threshold, self.config.detection_defaults())
        n_images = len(images.sizes) if isinstance(images, EncodedImages) else len(images_to_list(images))
        queries = self._queries(prompt, n_images, token_spans, labels, prompts)  # before any image work
        if segmenter is not None and isinstance(images, EncodedImages):
            raise ValueError("segmenter= needs the images themselves, not encode_image's features")
        if not isinstance(images, EncodedImages) and (tiles is not None or batch_size != 1):
            pictures = [load_image(x) for x in images_to_list(images)]
            callback = self._chunk_callback(queries)
            found = (
                detect_tiled(self, pictures, queries, thresholds, tiles, batch_size, callback)
                if tiles is not None
                else detect_batched(self, pictures, queries, thresholds, batch_size, callback)
            )
            found = _add_masks(segmenter, pictures, found, tiles)
            return found[0] if not isinstance(images, (list, tuple)) else found
        if tiles is not None:
            raise ValueError("tiles need the images themselves, not encode_image's features")
        encoded = images if isinstance(images, EncodedImages) else self.encode_image(images)
        crops = (encoded.features.crop(i) for i in range(len(encoded.sizes)))
        results = detect_queries(self, crops, queries, encoded.sizes, thresholds, self._chunk_callback(queries))
        if not isinstance(images, EncodedImages):
            results = _add_masks(segmenter, images_to_list(images), results, None)
        return results[0] if encoded.single else results

    def score_label_chunks(self, features: ImageFeatures, prompts: Sequence[ClassPrompt]) -> list[ChunkScores]:
        """Class scores of every query for each label chunk, one encoder and decoder pass each.

        ``features`` is one image (``ImageFeatures.crop``); an ``on_chunk`` callback hears of each pass.
        """
        if len(prompts) >= MANY_CHUNKS:
            _warn_cost(len(prompts), sum(len(p.ids) for p in prompts))
        return label_chunks(self, features, prompts, _on_chunk.get())

    def run_text(self, image: ImageFeatures, text: str) -> tuple[np.ndarray, np.ndarray]:
        """The pipeline's backend (``gdino.inference.pipeline.Backend``): one image's features and a
        normalised prompt -> (Q, T) token logits and (Q, 4) relative boxes, float32 numpy."""
        tokens = self.processor.tokenizer.encode([text])
        features = self.text_features(
            tokens.input_ids.to(self.device),
            tokens.attention_mask.to(self.device),
            tokens.token_type_ids.to(self.device),
        )
        logits, boxes, _ = self.detect_features(image, features)
        return logits[0].float().cpu().numpy(), boxes[0].float().cpu().numpy()

    def _chunk_callback(self, queries: Sequence[Query]) -> ChunkCallback | None:
        """The ``on_chunk`` callback for ``detect``, after warning once of a huge label list's cost."""
        for query in queries:
            if isinstance(query, ClassQuery) and len(query.prompts) >= MANY_CHUNKS:
                _warn_cost(len(query.prompts), sum(len(p.ids) for p in query.prompts))
        return _on_chunk.get()

    def _queries(
        self,
        prompt: TextInput | None,
        n_images: int,
        token_spans: TokenSpans | None,
        labels: Sequence[str] | None = None,
        prompts: Sequence[str | Sequence[str]] | None = None,
    ) -> list[Query]:
        """Per image a ``ClassQuery`` or a ``PhraseQuery`` (``gdino.inference.pipeline.resolve_queries``)."""
        tokenizer = self.processor.tokenizer
        special = self.config.special_token_ids
        return resolve_queries(prompt, n_images, tokenizer, special, token_spans, labels=labels, prompts=prompts)

    @torch.inference_mode()
    def encode_image(self, images: ImageLike | Sequence[ImageLike]) -> EncodedImages:
        """Runs the text-independent image side once, for ``detect`` with several prompts.

        ``model.detect(model.encode_image(img), prompt)`` equals ``model.detect(img, prompt)``.
        """
        pictures = [load_image(x) for x in images_to_list(images)]
        per_image = []
        for picture in pictures:  # one at a time, so each image's features are exactly its own
            pixels = self.processor(images=[picture])["pixel_values"].to(self.device, self.dtype)
            per_image.append(self.image_features(pixels))
        return EncodedImages(stack_images(per_image), [p.size for p in pictures], not isinstance(images, (list, tuple)))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> TextFeatures:
        """BERT for each distinct prompt of the batch, from the cache when it was seen before."""
        if torch.is_grad_enabled() or self.training or (token_type_ids is not None and bool(token_type_ids.any())):
            return super().text_features(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        cache = self._text_cache()
        for row in dict.fromkeys(rows):
            if row in cache:
                cache.move_to_end(row)
                continue
            cache[row] = super().text_features(torch.tensor([row], device=input_ids.device))
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return _pad_text([cache[row] for row in rows], input_ids.shape[1])

    def train(self, mode: bool = True) -> GroundingDinoForObjectDetection:
        """``nn.Module.train`` (and so ``eval``), emptying the prompt cache: a training loop's
        evaluation, even one after fused optimizer steps, encodes its prompts with the new weights."""
        self.clear_text_cache()
        return super().train(mode)

    def clear_text_cache(self) -> None:
        """Forgets every cached prompt encoding."""
        self.__dict__.pop("_text_cache_fingerprint", None)
        self.__dict__.pop("_prompt_cache", None)

    def _text_cache(self) -> OrderedDict[tuple[int, ...], TextFeatures]:
        """The prompt cache, emptied first if any weight it depends on changed since it was filled.

        The weights are fingerprinted by identity, storage, dtype, device and in-place version
        counter of every BERT and ``feat_map`` tensor: ``load_state_dict`` (copying or assigning),
        ``to()``, ``set_precision`` and a (non-fused) optimizer step each change at least one of them.
        """
        tensors = [*self.bert.parameters(), *self.bert.buffers(), *self.feat_map.parameters()]
        fingerprint = tuple((id(t), t.data_ptr(), _version(t), t.dtype, t.device) for t in tensors)
        if self.__dict__.get("_text_cache_fingerprint") != fingerprint:
            self.__dict__["_text_cache_fingerprint"] = fingerprint
            self.__dict__["_prompt_cache"] = OrderedDict()
        return self.__dict__["_prompt_cache"]

    def phrases(self, prompt: TextInput | None = None, *, labels: Sequence[str] | None = None) -> list[str]:
        """The phrases ``detect`` labels boxes with: "a cat. A remote control" -> ["a cat", "a remote control"].

        A label list gives its labels as they are (any number of them). Checks the prompt as
        ``detect`` does, without any image.

        Raises:
            PromptError: an empty or over-long prompt, one with no phrase (e.g. "."), duplicate
                labels, or several prompts.
        """
        return query_names(self._queries(prompt, 1, None, labels)[0])


def _add_masks(
    segmenter: Segmenter | None, images: Sequence[ImageLike], found: list[Detections], tiles: TileSettings | None
) -> list[Detections]:
    """Each image's detections with their masks (unchanged without a segmenter); with ``tiles``, each
    box segmented on a crop around it (``gdino.inference.tiled_masks``)."""
    if segmenter is None:
        return found
    return [add_region_masks(segmenter, image, detections, tiles) for image, detections in zip(images, found)]


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for an inference tensor, which has none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _pad_text(rows: list[TextFeatures], length: int) -> TextFeatures:
    """Stacks single-prompt text features (1, T_i, ...) into a batch padded to ``length`` tokens.

    Padding tokens attend only to themselves and have zero features; no other token sees them.
    """
    first = rows[0].features
    batch = len(rows)
    features = first.new_zeros(batch, length, first.shape[-1])
    padding = torch.ones(batch, length, dtype=torch.bool, device=first.device)
    allowed = torch.eye(length, dtype=torch.bool, device=first.device).repeat(batch, 1, 1)  # (B, T, T)
    positions = torch.zeros(batch, length, dtype=torch.long, device=first.device)
    for i, row in enumerate(rows):
        n = row.features.shape[1]
        features[i, :n] = row.features[0]
        padding[i, :n] = row.padding_mask[0]
        allowed[i, :n, :n] = row.self_attention[0]
        positions[i, :n] = row.position_ids[0]
    return TextFeatures(features, padding, allowed, positions)


def dtype_argument(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``from_pretrained``'s ``dtype`` (or its transformers name ``torch_dtype``) as a ``torch.dtype``.

    ``None`` and ``"auto"`` mean the weights' own dtype; a string names a torch dtype ("bfloat16").
    """
    if dtype is not None and torch_dtype is not None and _as_dtype(dtype) != _as_dtype(torch_dtype):
        raise ValueError(
            f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one (torch_dtype is "
            "transformers' name for dtype)"
        )
    return _as_dtype(dtype if dtype is not None else torch_dtype)


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    found = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    if not isinstance(found, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.bfloat16, or 'auto'; got {value!r}")
    return found
