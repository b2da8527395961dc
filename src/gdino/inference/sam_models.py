"""``Sam2Model``, ``SamModel`` and ``SamHQModel``: transformers' classes of those names, for its snippets.

```python
from gdino import Sam2Model, Sam2Processor   # was: from transformers import ...

model = Sam2Model.from_pretrained("facebook/sam2.1-hiera-tiny")
processor = Sam2Processor.from_pretrained("facebook/sam2.1-hiera-tiny")
inputs = processor(images=image, input_boxes=[[[75, 275, 1725, 850]]], return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs, multimask_output=False)
masks = processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])[0]
embeddings = model.get_image_embeddings(inputs["pixel_values"])   # once per image, then
outputs = model(image_embeddings=embeddings, input_points=points, input_labels=labels)
```

Each holds the model of ``gdino.models.sam2`` or ``gdino.models.sam`` (loaded strictly by
``load_sam2`` / ``load_sam``) and takes exactly the processor's keys; ``original_sizes`` and
``reshaped_input_sizes`` are accepted and not used, as there. Outputs: ``pred_masks`` (B, P, K, h, w)
logits, ``iou_scores`` (B, P, K), and SAM 2.1's ``object_score_logits`` (B, P, 1).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gdino.checkpoint.sam2_loading import load_sam2
from gdino.checkpoint.sam_loading import load_sam
from gdino.inference.detector import dtype_argument
from gdino.models.sam.model import Sam, SamOutput
from gdino.models.sam2.model import ImageEmbeddings, Sam2, Sam2Output
from gdino.utils.hub import resolve


def _local(model: str | os.PathLike[str], hub: dict[str, Any]) -> Path:
    """A hub id, packaged name, directory or file -> the local path the loaders read."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    checkpoint = resolve(model, **hub)
    return checkpoint.directory or checkpoint.weights


class Sam2Model(nn.Module):
    """SAM 2.1 as transformers' ``Sam2Model`` is called."""

    def __init__(self, model: Sam2) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] = "facebook/sam2.1-hiera-tiny",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **hub: Any,
    ) -> Sam2Model:
        """A hub id (the Hugging Face layout), a local directory or an original ``sam2.1_hiera_*.pt``.

        Raises:
            CheckpointError: nothing under that name, or a file that does not fit (named).
        """
        net = load_sam2(_local(model, hub), device=device, dtype=dtype_argument(dtype, torch_dtype))
        return cls(net).eval()

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: Tensor) -> list[Tensor]:
        """transformers' list: the two high-resolution maps (after conv_s0, conv_s1) and the image
        embedding (the no-memory embedding added): (B, C/8, 4e, 4e), (B, C/4, 2e, 2e), (B, C, e, e)."""
        encoded = self.model.encode_image(pixel_values.to(self._dtype()))
        return [*encoded.high_res_feats, encoded.image_embed]

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_points: Tensor | None = None,
        input_labels: Tensor | None = None,
        input_boxes: Tensor | None = None,
        input_masks: Tensor | None = None,
        image_embeddings: Sequence[Tensor] | None = None,
        multimask_output: bool = True,
        original_sizes: Tensor | None = None,
        **unused: Any,
    ) -> Sam2Output:
        """Masks for each image's prompts (pixels of the model's input, as the processor gives them).

        Raises:
            ValueError: neither or both of pixel_values and image_embeddings; prompts that do not fit.
        """
        _refuse(unused, {"reshaped_input_sizes"})
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("give either pixel_values or image_embeddings, not both or neither")
        if image_embeddings is not None:
            *high, image = image_embeddings
            encoded = ImageEmbeddings(image, (high[0], high[1]))
        else:
            assert pixel_values is not None
            encoded = self.model.encode_image(pixel_values.to(self._dtype()))
        cast = self._cast
        return self.model.decode(
            encoded, cast(input_points), input_labels, cast(input_boxes), cast(input_masks), multimask_output
        )

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _cast(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.to(self._dtype())


class SamModel(nn.Module):
    """SAM (and, as ``SamHQModel``, SAM-HQ) as transformers' ``SamModel`` is called."""

    default_model = "facebook/sam-vit-base"

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **hub: Any,
    ) -> SamModel:
        """A hub id (the Hugging Face layout), a local directory or an original ``sam_vit_*.pth`` /
        ``sam_hq_vit_*.pth``.

        Raises:
            CheckpointError: nothing under that name, or a file that does not fit (named).
        """
        net = load_sam(_local(model or cls.default_model, hub), device=device, dtype=dtype_argument(dtype, torch_dtype))
        return cls(net).eval()

    @torch.no_grad()
    def get_image_embeddings(self, pixel_values: Tensor) -> Any:
        """(B, C, g, g) image embeddings (SAM-HQ: with the list of its early ViT features, as transformers)."""
        encoded = self.model.encode_image(pixel_values.to(self._dtype()))
        if encoded.intermediate_embeddings is None:
            return encoded.image_embeddings
        return encoded.image_embeddings, [encoded.intermediate_embeddings]

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_points: Tensor | None = None,
        input_labels: Tensor | None = None,
        input_boxes: Tensor | None = None,
        input_masks: Tensor | None = None,
        image_embeddings: Tensor | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        intermediate_embeddings: Sequence[Tensor] | Tensor | None = None,
        original_sizes: Tensor | None = None,
        reshaped_input_sizes: Tensor | None = None,
        **unused: Any,
    ) -> SamOutput:
        """Masks for each image's prompts (pixels of the model's input, as the processor gives them).

        Raises:
            ValueError: neither or both of pixel_values and image_embeddings; prompts that do not fit.
        """
        _refuse(unused, set())
        early = intermediate_embeddings
        if early is not None and not isinstance(early, Tensor):  # transformers' list: the first is used
            early = early[0]
        cast = self._cast
        return self.model(
            cast(pixel_values),
            cast(input_points),
            input_labels,
            cast(input_boxes),
            cast(input_masks),
            cast(image_embeddings),
            cast(early),
            multimask_output,
            hq_token_only,
        )

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _cast(self, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.to(self._dtype())


class SamHQModel(SamModel):
    """SAM-HQ as transformers' ``SamHQModel`` is called (``hq_token_only`` as there)."""

    default_model = "syscv-community/sam-hq-vit-base"


def _refuse(unused: dict[str, Any], accepted: set[str]) -> None:
    extra = sorted(set(unused) - accepted)
    if extra:
        raise TypeError(f"unexpected arguments {extra}")
