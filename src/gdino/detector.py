"""The one-call API: ``GroundingDinoForObjectDetection.from_pretrained(...).detect(image, prompt)``.

The class is the model (``model(**inputs)`` returns logits and boxes as transformers' does) plus
loading and a processor, so the model card's snippet runs with only its import line changed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .boxes import cxcywh_to_xyxy
from .chunking import Candidates, best_per_query, class_nms, score_chunks
from .classes import ClassQuery, TokenSpans, queries_for_images
from .detections import Detections
from .image import ImageLike, images_to_list, load_image
from .model.grounding_dino import GroundingDino, ImageFeatures, TextFeatures, stack_images
from .processing import GroundingDinoProcessor
from .text import TextInput, phrase_for_tokens, phrase_names
from .weights import DEFAULT_MODEL_ID, load_model


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
    small cache (``text_cache_size`` entries) while gradients are off.
    """

    processor: GroundingDinoProcessor
    text_cache_size: int = 64

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        **unused: Any,
    ) -> GroundingDinoForObjectDetection:
        """Loads a hub id, a local Hugging Face directory or an original ``.pth`` checkpoint."""
        net, checkpoint = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, model_class=cls)
        assert isinstance(net, cls)
        if checkpoint.directory is not None:
            net.processor = GroundingDinoProcessor.from_pretrained(checkpoint.directory)
        else:
            net.processor = GroundingDinoProcessor.default(net.config.max_text_len)
        return net

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def detect(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompt: TextInput,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        *,
        token_spans: TokenSpans | None = None,
        nms_threshold: float | None = None,
    ) -> Detections | list[Detections]:
        """Finds the prompt's phrases, or the labels of a label list, in one image or a list of images.

        A string prompt is scored phrase by phrase: a box's score is its best token's. A label
        list (any length: over 256 tokens it is run in chunks on the same image features) and
        ``token_spans`` are scored label by label (``gdino.classes``): a box's label is the one
        whose tokens' mean probability is highest, its score is that mean, and ``label_ids``
        index the list.

        Args:
            images: a PIL image, a uint8 numpy array (H, W, 3) or a file path; or a list of them.
            prompt: "a cat. a remote control." or a list of labels ["cat", "remote control"].
            box_threshold: keep a box when its score is above this.
            text_threshold: phrase prompts only: keep a box only when its phrase scores at least this.
            token_spans: labels as character spans of a string prompt, e.g. for "the man in a red
                hat", ``[[(0, 7)], [(11, 20)]]`` gives the labels "the man" and "a red hat".
            nms_threshold: if given, drop a box overlapping a better box of the same label by an
                IoU above this.

        Returns:
            ``Detections`` for one image, a list of them for a list.
        """
        encoded = images if isinstance(images, EncodedImages) else self.encode_image(images)
        queries = self._queries(prompt, len(encoded.sizes), token_spans)  # checked before the forward pass
        results = []
        for i, (query, size) in enumerate(zip(queries, encoded.sizes)):
            # One image at a time: the query selection orders near-tied proposals by score, and
            # 1e-7 differences between batched and single matrix products can swap two of them,
            # so only the single-image computation guarantees batch-independent detections.
            if isinstance(query, ClassQuery):
                found = best_per_query(score_chunks(self, encoded.features.crop(i), query.prompts))
                results.append(_class_detections(found, query.names, size, box_threshold, nms_threshold))
                continue
            text, spans, names = query
            tokens = self.processor(text=[text]).to(self.device)
            features = self.text_features(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
            logits, boxes, _ = self.detect_features(encoded.features.crop(i), features)
            found = self._detections(logits[0], boxes[0], spans, names, size, box_threshold, text_threshold)
            results.append(found if nms_threshold is None else _nms_detections(found, nms_threshold))
        return results[0] if encoded.single else results

    def _queries(self, prompt: TextInput, n_images: int, token_spans: TokenSpans | None) -> list[Any]:
        """Per image a ``ClassQuery``, or (text, phrase token spans, phrase names) for a phrase prompt."""
        queries = queries_for_images(prompt, n_images, self.processor.tokenizer, token_spans)
        return [q if isinstance(q, ClassQuery) else (q, *self._phrases(q)) for q in queries]

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
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> TextFeatures:
        """BERT for each distinct prompt of the batch, from the cache when it was seen before."""
        if torch.is_grad_enabled() or self.training or (token_type_ids is not None and bool(token_type_ids.any())):
            return super().text_features(input_ids, attention_mask, token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        cache = self.__dict__.setdefault("_text_cache", OrderedDict())
        for row in dict.fromkeys(rows):
            key = (row, self.dtype, self.device)
            if key in cache:
                cache.move_to_end(key)
                continue
            cache[key] = super().text_features(torch.tensor([row], device=input_ids.device))
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return _pad_text([cache[(row, self.dtype, self.device)] for row in rows], input_ids.shape[1])

    def phrases(self, prompt: TextInput) -> list[str]:
        """The phrases ``detect`` labels boxes with: "a cat. A remote control" -> ["a cat", "a remote control"].

        A label list gives its labels as they are (any number of them).

        Raises:
            PromptError: an empty or over-long prompt, one with no phrase (e.g. "."), or several prompts.
        """
        query = self._queries(prompt, 1, None)[0]
        return list(query.names) if isinstance(query, ClassQuery) else query[2]

    def _phrases(self, text: str) -> tuple[list[tuple[int, int]], list[str]]:
        """Token spans and texts of a normalised prompt's phrases (``gdino.text.phrase_names``)."""
        return phrase_names(text, self.processor.tokenizer, self.config.special_token_ids)

    def _detections(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        spans: list[tuple[int, int]],
        names: list[str],
        size: tuple[int, int],
        box_threshold: float,
        text_threshold: float,
    ) -> Detections:
        """One image's queries -> thresholded, labelled, sorted detections in pixels."""
        probs = logits.float().sigmoid()  # (Q, T), 0 past the prompt (logits -inf there)
        best = probs.max(-1).values
        phrase, phrase_score = phrase_for_tokens(probs, spans)
        keep = (best > box_threshold) & (phrase_score >= text_threshold)
        order = best[keep].argsort(descending=True)
        kept_boxes = boxes[keep][order].float()
        width, height = size
        xyxy = cxcywh_to_xyxy(kept_boxes)
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
        label_ids = phrase[keep][order].cpu().numpy().astype(np.int64)
        return Detections(
            boxes=xyxy.cpu().numpy().astype(np.float32),
            scores=best[keep][order].cpu().numpy().astype(np.float32),
            labels=tuple(names[i] for i in label_ids),
            label_ids=label_ids,
            image_size=(width, height),
        )


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


def _class_detections(
    found: Candidates, names: tuple[str, ...], size: tuple[int, int], box_threshold: float, nms_threshold: float | None
) -> Detections:
    """Candidates with label-level scores -> thresholded, optionally NMS-ed, sorted detections in pixels."""
    found = found.select(torch.nonzero(found.scores > box_threshold).flatten())
    width, height = size
    xyxy = cxcywh_to_xyxy(found.boxes) * torch.tensor([width, height, width, height], device=found.boxes.device)
    if nms_threshold is None:
        order = found.scores.argsort(descending=True, stable=True)
    else:
        order = class_nms(xyxy, found.scores, found.ids, nms_threshold)
    label_ids = found.ids[order].cpu().numpy().astype(np.int64)
    return Detections(
        boxes=xyxy[order].cpu().numpy().astype(np.float32),
        scores=found.scores[order].cpu().numpy().astype(np.float32),
        labels=tuple(names[i] for i in label_ids),
        label_ids=label_ids,
        image_size=(width, height),
    )


def _nms_detections(found: Detections, nms_threshold: float) -> Detections:
    """``found`` less the boxes that overlap a better box of the same label by more than the threshold."""
    keep = class_nms(
        torch.from_numpy(found.boxes), torch.from_numpy(found.scores), torch.from_numpy(found.label_ids), nms_threshold
    ).numpy()
    return Detections(found.boxes[keep], found.scores[keep], tuple(found.labels[i] for i in keep),
                      found.label_ids[keep], found.image_size)
