"""The whole model: ``Sam(config)`` holds ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``.

Inputs and outputs follow transformers' ``SamModel`` and ``SamHQModel`` (names and shapes), so a
processor written for them can feed it:

```text
out = model(pixel_values, input_boxes=boxes)                 # pixel_values (B, 3, S, S), normalised
out.pred_masks, out.iou_scores                               # (B, P, K, 4g, 4g) logits, (B, P, K)
image = model.get_image_embeddings(pixel_values)             # once per image ...
model(image_embeddings=image.image_embeddings, intermediate_embeddings=image.intermediate_embeddings,
      input_points=points, input_labels=labels)              # ... then any number of prompts
```

Pixels are normalised and padded to the square input outside the model (the processor's job);
prompts are in pixels of that input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gdino.models.sam.config import SamConfig
from gdino.models.sam.image_encoder import ImageEncoderViT
from gdino.models.sam.mask_decoder import MaskDecoder
from gdino.models.sam.prompt_encoder import PromptEncoder


@dataclass(frozen=True)
class SamImageEmbeddings:
    """What the image encoder gives, to reuse for several prompts.

    Attributes:
        image_embeddings: (B, prompt_dim, g, g).
        intermediate_embeddings: SAM-HQ: (B, g, g, vit width), the first global ViT block's
            output; None for SAM.
    """

    image_embeddings: Tensor
    intermediate_embeddings: Tensor | None = None


@dataclass(frozen=True)
class SamOutput:
    """The masks of every prompt.

    Attributes:
        pred_masks: (B, P, K, 4g, 4g) low-resolution mask logits (positive inside), in the square
            input's frame; K is 3 with multi-mask output, else 1 (SAM-HQ: see ``SamConfig.hq_multimask``).
        iou_scores: (B, P, K) the predicted IoU of each mask.
    """

    pred_masks: Tensor
    iou_scores: Tensor


class Sam(nn.Module):
    """SAM, or SAM-HQ with ``config.hq``; the original's module and parameter names."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.image_encoder = ImageEncoderViT(config.vision, config.prompt_dim, keep_early=config.hq)
        self.prompt_encoder = PromptEncoder(config)
        self.mask_decoder = MaskDecoder(config)

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: Tensor) -> SamImageEmbeddings:
        """Runs the image encoder alone (no gradients), for :meth:`forward` with ``image_embeddings``."""
        return self.encode_image(pixel_values)

    def encode_image(self, pixel_values: Tensor) -> SamImageEmbeddings:
        """The image encoder on (B, 3, S, S) normalised pixels."""
        embeddings, early = self.image_encoder(pixel_values)
        return SamImageEmbeddings(embeddings, early)

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_points: Tensor | None = None,
        input_labels: Tensor | None = None,
        input_boxes: Tensor | None = None,
        input_masks: Tensor | None = None,
        image_embeddings: Tensor | None = None,
        intermediate_embeddings: Tensor | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
    ) -> SamOutput:
        """Predicts masks for the prompts of each image.

        Args:
            pixel_values: (B, 3, S, S) normalised pixels; or give ``image_embeddings`` instead.
            input_points: (B, P, N, 2) pixels of the square input, x y; ``input_labels`` (B, P, N)
                1 foreground, 0 background, -1 not a point, -10 padding (default all 1).
            input_boxes: (B, P, 4) pixels, x0 y0 x1 y1; with points, P must agree.
            input_masks: (B, 1 or P, 4g, 4g) mask logits from an earlier prediction.
            image_embeddings: (B, prompt_dim, g, g) from :meth:`get_image_embeddings`.
            intermediate_embeddings: SAM-HQ, with ``image_embeddings``: (B, g, g, width).
            multimask_output: three masks per prompt instead of one.
            hq_token_only: SAM-HQ: the HQ mask alone.

        Raises:
            ValueError: neither or both of pixel_values and image_embeddings, or prompts whose
                shapes do not fit (the message names them).
        """
        image = self._image(pixel_values, image_embeddings, intermediate_embeddings)
        sparse, dense = self.prompt_encoder(input_points, input_labels, input_boxes, input_masks)
        b = image.image_embeddings.shape[0]
        if sparse.shape[0] not in (1, b) or dense.shape[0] not in (1, b):
            raise ValueError(f"the prompts are for {max(sparse.shape[0], dense.shape[0])} images, the batch has {b}")
        masks, scores = self.mask_decoder(
            image.image_embeddings,
            self.prompt_encoder.dense_positions(),
            sparse,
            dense,
            multimask_output,
            hq_token_only,
            image.intermediate_embeddings,
        )
        return SamOutput(pred_masks=masks, iou_scores=scores)

    def _image(
        self, pixel_values: Tensor | None, image_embeddings: Tensor | None, intermediate: Tensor | None
    ) -> SamImageEmbeddings:
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("give either pixel_values or image_embeddings, not both or neither")
        if pixel_values is not None:
            return self.encode_image(pixel_values)
        assert image_embeddings is not None
        return SamImageEmbeddings(image_embeddings, intermediate)
