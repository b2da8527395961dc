"""The one-call API: ``GroundingDinoForObjectDetection.from_pretrained(...).detect(image, prompt)``.

The class is the model (``model(**inputs)`` returns logits and boxes as transformers' does) plus
loading and a processor, so the model card's snippet runs with only its import line changed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image import ImageLike, images_to_list, load_image
from .model.grounding_dino import GroundingDino
from .processing import GroundingDinoProcessor
from .text import PromptError, TextInput, phrase_for_tokens, phrase_spans, prompts_for_images, prompts_from_text
from .weights import DEFAULT_MODEL_ID, load_model


@dataclass(frozen=True)
class Detections:
    """What was found in one image, best first.

    Attributes:
        boxes: (N, 4) float32 (x0, y0, x1, y1) in pixels of the original image.
        scores: (N,) float32 in [0, 1].
        labels: N phrases of the prompt, e.g. "a remote control".
        label_ids: (N,) int64 index of each label's phrase in the prompt (of the label in a label list).
        image_size: (width, height) of the original image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: tuple[str, ...]
    label_ids: np.ndarray
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.labels)

    def to_list(self, decimals: int = 2) -> list[dict[str, Any]]:
        """JSON-ready detections: ``[{"box": [x0, y0, x1, y1], "score", "label", "label_id"}]``."""
        return [
            {
                "box": [round(float(v), decimals) for v in box],
                "score": round(float(score), 4),
                "label": label,
                "label_id": int(label_id),
            }
            for box, score, label, label_id in zip(self.boxes, self.scores, self.labels, self.label_ids)
        ]


class GroundingDinoForObjectDetection(GroundingDino):
    """Grounding DINO with loading, a processor and ``detect``."""

    processor: GroundingDinoProcessor

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
    ) -> Detections | list[Detections]:
        """Finds the prompt's phrases in one image or a list of images.

        Args:
            images: a PIL image, a uint8 numpy array (H, W, 3) or a file path; or a list of them.
            prompt: "a cat. a remote control." or a list of labels ["cat", "remote control"].
            box_threshold: keep a box when its best token scores above this.
            text_threshold: keep a box only when its label's phrase scores at least this.

        Returns:
            ``Detections`` for one image, a list of them for a list.
        """
        single = not isinstance(images, (list, tuple))
        pictures = [load_image(x) for x in images_to_list(images)]
        texts = prompts_for_images(prompts_from_text(prompt), len(pictures))
        phrases = [self._phrases(text) for text in texts]  # checks the prompts before the forward pass
        inputs = self.processor(images=pictures, text=prompt).to(self.device)
        out = self(**inputs)
        results = [
            self._detections(out.logits[i], out.pred_boxes[i], *phrases[i], pic, box_threshold, text_threshold)
            for i, pic in enumerate(pictures)
        ]
        return results[0] if single else results

    def phrases(self, prompt: TextInput) -> list[str]:
        """The phrases ``detect`` labels boxes with: "a cat. A remote control" -> ["a cat", "a remote control"].

        Raises:
            PromptError: an empty or over-long prompt, one with no phrase (e.g. "."), or several prompts.
        """
        texts = prompts_from_text(prompt)
        if len(texts) != 1:
            raise PromptError(f"expected one prompt or one list of labels, got {len(texts)} prompts")
        return self._phrases(texts[0])[1]

    def _phrases(self, text: str) -> tuple[list[tuple[int, int]], list[str]]:
        """Token spans and texts of a normalised prompt's phrases.

        The texts are cut from the prompt by the tokens' character offsets, so a phrase comes back
        as written ("t-shirt"), not as re-joined word pieces ("t - shirt").
        """
        ids = self.processor.tokenizer.encode([text]).input_ids[0].tolist()  # PromptError if too long
        spans = phrase_spans(ids, self.config.special_token_ids)
        if not spans:
            raise PromptError(f"the prompt {text!r} has no phrase, only separators such as '.'; "
                              "give e.g. 'a cat. a remote control.'")
        offsets = self.processor.tokenizer._tok.encode(text).offsets  # the same tokens as ids
        names = [text[offsets[s][0] : offsets[e - 1][1]] for s, e in spans]
        return spans, names

    def _detections(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        spans: list[tuple[int, int]],
        names: list[str],
        picture: Image.Image,
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
        width, height = picture.size
        cx, cy, w, h = kept_boxes.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype, device=xyxy.device)
        label_ids = phrase[keep][order].cpu().numpy().astype(np.int64)
        return Detections(
            boxes=xyxy.cpu().numpy().astype(np.float32),
            scores=best[keep][order].cpu().numpy().astype(np.float32),
            labels=tuple(names[i] for i in label_ids),
            label_ids=label_ids,
            image_size=(width, height),
        )
