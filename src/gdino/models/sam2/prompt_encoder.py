"""The prompt encoder: points and boxes to sparse tokens, a mask to a dense embedding.

Coordinates are pixels of the model's square input (``image_size``, after resizing), x then y.
A point is encoded by random Fourier features of its position (``PositionEmbeddingRandom``) plus
the learnt embedding of its label: 0 negative, 1 positive, 2 and 3 a box's top-left and
bottom-right corners; -1 marks a padding point, which gets ``not_a_point_embed`` instead.

Boxes follow the original image predictor (``sam2_image_predictor._predict``): each box becomes two
corner points labelled 2 and 3, placed before the prompt's points, and one padding point ends every
prompt. transformers' ``Sam2PromptEncoder`` embeds the points first and then the corners with a
padding point after them: the same tokens in another order, which the mask decoder (attention
without token positions) does not see, so the outputs agree to float rounding. transformers' label
-10 (a zero token for its processor's padding) is not the original's; here any label outside
-1..3 gets its position encoding alone, as in the original.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from gdino.models.sam2.common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) in [0, 1]: sin and cos of 2 pi (2 xy - 1) @ G, G a fixed (2, F)
    Gaussian matrix (a buffer the checkpoint holds)."""

    positional_encoding_gaussian_matrix: Tensor

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def encode(self, coords: Tensor) -> Tensor:
        """(..., 2) in [0, 1] -> (..., 2F)."""
        gaussian = self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * ((2 * coords.to(gaussian.dtype) - 1) @ gaussian)  # (..., F)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def grid(self, h: int, w: int) -> Tensor:
        """(2F, h, w): the encoding of every cell centre of an h x w grid."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        xy = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # (h, w, 2)
        return self.encode(xy).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Points, boxes and masks to the decoder's sparse tokens and dense embedding."""

    def __init__(self, embed_dim: int, embedding_size: int, image_size: int, mask_in_chans: int) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.image_size = image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))  # labels 0..3
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    @property
    def mask_input_size(self) -> int:
        """The side of a mask input (256 for 1024): 4x the image embedding, as the masks come out."""
        return 4 * self.embedding_size

    def dense_pe(self) -> Tensor:
        """(1, C, e, e): the position encoding of every image-embedding cell."""
        return self.pe_layer.grid(self.embedding_size, self.embedding_size)[None]

    def embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """(N, T, 2) pixel coordinates and (N, T) labels -> (N, T + 1, C): a padding point appended."""
        coords = torch.cat([coords + 0.5, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)  # pixel centres
        labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        embedding = self.pe_layer.encode(coords.to(torch.float32) / self.image_size)  # (N, T + 1, C)
        labels = labels[..., None]  # (N, T + 1, 1)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight.to(embedding.dtype), embedding)
        for label, table in enumerate(cast("list[nn.Embedding]", self.point_embeddings)):
            embedding = torch.where(labels == label, embedding + table.weight, embedding)
        return embedding

    def embed_boxes_and_points(
        self, boxes: Tensor | None, coords: Tensor | None, labels: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """(N, 4) xyxy boxes and (N, T, 2) points with (N, T) labels -> one point list, corners first."""
        parts = []
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)  # (N, 2, 2): top-left, bottom-right
            corner_labels = torch.tensor([2, 3], device=boxes.device).expand(corners.shape[0], 2)
            parts.append((corners, corner_labels))
        if coords is not None and labels is not None:
            parts.append((coords, labels.to(torch.long)))
        return torch.cat([c for c, _ in parts], dim=1), torch.cat([lab for _, lab in parts], dim=1)

    def embed_masks(self, masks: Tensor) -> Tensor:
        """(N, 1, 4e, 4e) mask logits -> (N, C, e, e)."""
        return self.mask_downscaling(masks)

    def no_mask(self) -> Tensor:
        """(1, C, 1, 1): the dense embedding without a mask input, broadcast over the image embedding."""
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1)
