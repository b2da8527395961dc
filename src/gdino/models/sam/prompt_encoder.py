"""SAM's prompt encoder: points and boxes become sparse tokens, a mask becomes a dense map.

Coordinates are pixels of the model's square input (``image_size``, 1024 for the published
models), x then y. A point or a box corner is encoded by random Fourier features of its position
(``PositionEmbeddingRandom``, shared with the image's dense positional encoding) plus a learnt
embedding of its kind. Shapes follow transformers' ``SamModel`` (B images, P prompts per image,
each prompt decoded into its own masks):

* points (B, P, N, 2) with labels (B, P, N): 1 foreground, 0 background, -1 "not a point" (the
  padding point the original appends when no box is given), -10 a padding point that transformers'
  processor adds and encodes as zeros (not in the original, which has no such label);
* boxes (B, P, 4), x0 y0 x1 y1: two corner tokens;
* masks (B, 1, 4g, 4g) for one mask per image, as transformers takes them, or (B, P, 4g, 4g) for
  one per prompt, as the original's predictor passes a previous step's low-resolution masks.

Without a mask the dense embedding is the learnt ``no_mask_embed`` everywhere.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from gdino.models.sam.common import LayerNorm2d
from gdino.models.sam.config import SamConfig

NOT_A_POINT = -1
PADDING_POINT = -10  # transformers' label for processor padding (encoded as zeros)


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of positions in [0, 1]^2: ``[sin(2 pi (2p - 1) G), cos(...)]``.

    ``G`` (2, dim / 2) was drawn at random before training and is stored in the checkpoints (a
    buffer in the original, a parameter in transformers).
    """

    positional_encoding_gaussian_matrix: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, dim // 2))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) positions in [0, 1] -> (..., dim)."""
        gaussian = self.positional_encoding_gaussian_matrix
        angles = 2 * math.pi * ((2 * coords.to(gaussian.dtype) - 1) @ gaussian)  # (..., dim / 2)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def grid(self, size: int) -> Tensor:
        """The encoding of every cell centre of a ``size`` x ``size`` grid: (dim, size, size)."""
        gaussian = self.positional_encoding_gaussian_matrix
        centres = (torch.arange(size, device=gaussian.device, dtype=gaussian.dtype) + 0.5) / size  # (size,)
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return self.encode(torch.stack([x, y], dim=-1)).permute(2, 0, 1)  # (dim, size, size)

    def points(self, coords: Tensor, image_size: int) -> Tensor:
        """(..., 2) pixel positions in a square image of ``image_size`` -> (..., dim)."""
        return self.encode(coords / image_size)


def _mask_downscaling(config: SamConfig) -> nn.Sequential:
    """(B, 1, 4g, 4g) -> (B, prompt_dim, g, g): two stride-2 convs with norms and GELU, then a 1x1
    conv; ``mask_downscaling.0`` ... ``.6`` as in the original."""
    mid, out = config.mask_in_channels // 4, config.mask_in_channels
    return nn.Sequential(
        nn.Conv2d(1, mid, kernel_size=2, stride=2),
        LayerNorm2d(mid),
        nn.GELU(),
        nn.Conv2d(mid, out, kernel_size=2, stride=2),
        LayerNorm2d(out),
        nn.GELU(),
        nn.Conv2d(out, config.prompt_dim, kernel_size=1),
    )


class PromptEncoder(nn.Module):
    """Points, boxes and masks -> sparse (B, P, T, prompt_dim) and dense (B, 1 or P, prompt_dim, g, g)."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        self.dim = config.prompt_dim
        self.image_size = config.vision.image_size
        self.grid = config.vision.grid
        self.pe_layer = PositionEmbeddingRandom(config.prompt_dim)
        # background point, foreground point, box top-left corner, box bottom-right corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, config.prompt_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, config.prompt_dim)
        self.mask_downscaling = _mask_downscaling(config)
        self.no_mask_embed = nn.Embedding(1, config.prompt_dim)

    def dense_positions(self) -> Tensor:
        """The image embedding's positional encoding, (1, prompt_dim, g, g)."""
        return self.pe_layer.grid(self.grid)[None]

    def kind_embedding(self, kind: int) -> Tensor:
        """(1, dim): 0 background point, 1 foreground point, 2 and 3 a box's top-left and bottom-right."""
        return cast(nn.Embedding, self.point_embeddings[kind]).weight

    def embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """(B, P, N, 2) pixels and (B, P, N) labels -> (B, P, N (+1 with ``pad``), dim)."""
        points = points + 0.5  # to the pixel's centre
        if pad:  # the original's "not a point" token when no box follows
            points = torch.cat([points, points.new_zeros((*points.shape[:2], 1, 2))], dim=2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:2], 1), NOT_A_POINT)], dim=2)
        embedding = self.pe_layer.points(points, self.image_size)  # (B, P, N, dim)
        kinds = [
            (NOT_A_POINT, self.not_a_point_embed.weight, True),
            (PADDING_POINT, embedding.new_zeros(self.dim), True),
            (0, self.kind_embedding(0), False),
            (1, self.kind_embedding(1), False),
        ]
        for label, vector, replaces in kinds:
            where = (labels == label)[..., None]  # (B, P, N, 1)
            embedding = torch.where(where, vector if replaces else embedding + vector, embedding)
        return embedding

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """(B, P, 4) pixels x0 y0 x1 y1 -> (B, P, 2, dim): one token per corner."""
        corners = (boxes + 0.5).reshape(*boxes.shape[:2], 2, 2)  # (B, P, 2 corners, xy)
        embedding = self.pe_layer.points(corners, self.image_size)  # (B, P, 2, dim)
        kind = torch.cat([self.kind_embedding(2), self.kind_embedding(3)])  # (2, dim)
        return embedding + kind

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(B, M, 4g, 4g) mask logits -> (B, M, dim, g, g)."""
        b, m, h, w = masks.shape
        dense = self.mask_downscaling(masks.reshape(b * m, 1, h, w))  # (B * M, dim, g, g)
        return dense.reshape(b, m, *dense.shape[1:])

    def forward(
        self,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Embeds the prompts (see the module docstring for their shapes).

        Point labels default to 1 (foreground), as in transformers. With neither points nor boxes
        there is one prompt per image with no sparse tokens (T = 0).

        Returns:
            sparse: (B, P, T, dim), T = N (+1 padding point without boxes) + 2 per box.
            dense: (B, 1, dim, g, g) without masks or with one per image, else (B, P, dim, g, g).
        """
        b, p = _check_prompts(points, labels, boxes, masks, 4 * self.grid)
        tokens = []
        if points is not None:
            labels = labels if labels is not None else torch.ones(points.shape[:3], device=points.device)
            tokens.append(self.embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self.embed_boxes(boxes))
        weight = self.no_mask_embed.weight
        sparse = torch.cat(tokens, dim=2) if tokens else weight.new_zeros((b, p, 0, self.dim))
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = weight.reshape(1, 1, -1, 1, 1).expand(b, 1, -1, self.grid, self.grid)
        return sparse, dense


def _check_prompts(
    points: Tensor | None, labels: Tensor | None, boxes: Tensor | None, masks: Tensor | None, mask_size: int
) -> tuple[int, int]:
    """The number of images B and prompts per image P the prompts hold.

    Raises:
        ValueError: a prompt of the wrong shape, or prompts that disagree on B or P.
    """
    sizes: dict[str, tuple[int, int]] = {}
    if points is not None:
        if points.ndim != 4 or points.shape[-1] != 2:
            raise ValueError(f"input_points must be (B, P, N, 2), got {tuple(points.shape)}")
        if labels is not None and labels.shape != points.shape[:3]:
            raise ValueError(f"input_labels must be (B, P, N) = {tuple(points.shape[:3])}, got {tuple(labels.shape)}")
        sizes["input_points"] = (points.shape[0], points.shape[1])
    elif labels is not None:
        raise ValueError("input_labels were given without input_points")
    if boxes is not None:
        if boxes.ndim != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"input_boxes must be (B, P, 4), got {tuple(boxes.shape)}")
        sizes["input_boxes"] = (boxes.shape[0], boxes.shape[1])
    shapes = list(sizes.values())
    if any(shape != shapes[0] for shape in shapes[1:]):  # no set: hashing a traced size would fix it (ONNX export)
        raise ValueError(f"the prompts disagree on (images, prompts per image): {sizes}")
    b, p = next(iter(sizes.values()), (0, 1))
    if masks is not None:
        if masks.ndim != 4 or masks.shape[-2:] != (mask_size, mask_size):
            raise ValueError(f"input_masks must be (B, 1 or P, {mask_size}, {mask_size}), got {tuple(masks.shape)}")
        if (b and masks.shape[0] != b) or masks.shape[1] not in (1, p):
            raise ValueError(f"input_masks {tuple(masks.shape)} do not fit {b or 'B'} images of {p} prompts")
        b = masks.shape[0]
    return b or 1, p
