"""What flows between the parts of the model: encoded text and multi-scale image features.

Masks follow one convention here and below: True marks padding (``padding_mask``), except the
per-level image ``masks``, which mark the image (True on real pixels) as the processor's
``pixel_mask`` does; ``ImageFeatures.padding`` turns them into the flattened padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextFeatures:
    """The encoded prompt.

    Attributes:
        features: (B, T, D) BERT output projected to the detector's width.
        padding_mask: (B, T) True on padding tokens.
        self_attention: (B, T, T) True where a token may attend another (within its phrase).
        position_ids: (B, T) positions restarting in each phrase.
    """

    features: Tensor
    padding_mask: Tensor
    self_attention: Tensor
    position_ids: Tensor


@dataclass
class DenoisingQueries:
    """Extra decoder queries for denoising training (DN-DETR, DINO's contrastive denoising):
    noised copies of the target boxes, decoded beside the matching queries, which never see them.

    A query's content is the enhanced text averaged over its phrase's tokens (no parameters of its
    own, so checkpoints keep the published layout). Queries come in groups; a group sees itself
    and the matching queries, never another group.

    Attributes:
        token_maps: (B, N, W) each query's phrase as token weights summing to 1 (W >= T).
        boxes: (B, N, 4) the noised (cx, cy, w, h) in [0, 1]: the queries' initial reference boxes.
        valid: (B, N) False on slots that pad an image with fewer targets than the batch's most.
        groups: (N, N) True where query i may attend query j (the same group).
    """

    token_maps: Tensor
    boxes: Tensor
    valid: Tensor
    groups: Tensor


@dataclass
class ImageFeatures:
    """The multi-scale image features, before the feature enhancer.

    Attributes:
        maps: per level, (B, D, H_l, W_l) projected feature maps, zero past each image's extent.
        masks: per level, (B, H_l, W_l) True on the image, False on padding.
    """

    maps: list[Tensor]
    masks: list[Tensor]

    def crop(self, i: int) -> ImageFeatures:
        """Image ``i`` alone, cut to its own extent: (1, D, h_l, w_l) maps, as if encoded by itself."""
        maps, masks = [], []
        for m, mask in zip(self.maps, self.masks):
            h, w = int(mask[i, :, 0].sum()), int(mask[i, 0, :].sum())
            maps.append(m[i : i + 1, :, :h, :w])
            masks.append(mask[i : i + 1, :h, :w])
        return ImageFeatures(maps, masks)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(H_l, W_l) of each level."""
        return [(m.shape[-2], m.shape[-1]) for m in self.maps]

    def flatten(self) -> tuple[Tensor, Tensor]:
        """The levels as one token sequence: (B, S, D) tokens and (B, S) padding mask (True on padding)."""
        tokens = torch.cat([m.flatten(2).transpose(1, 2) for m in self.maps], 1)  # (B, S, D)
        padding = ~torch.cat([m.flatten(1) for m in self.masks], 1)  # (B, S)
        return tokens, padding

    def valid_ratios(self, dtype: torch.dtype) -> Tensor:
        """(B, levels, 2): the fraction of each level's width and height covered by the image."""
        ratios = []
        for m in self.masks:
            h = m[:, :, 0].sum(1).to(dtype) / m.shape[1]
            w = m[:, 0, :].sum(1).to(dtype) / m.shape[2]
            ratios.append(torch.stack([w, h], -1))
        return torch.stack(ratios, 1)


def stack_images(images: list[ImageFeatures]) -> ImageFeatures:
    """Single-image features (batch 1 each) -> one zero-padded batch with masks."""
    return pad_levels([f.maps for f in images])


def pad_levels(per_image: list[list[Tensor]]) -> ImageFeatures:
    """Stacks per-image level maps (1, D, h, w) into zero-padded (B, D, H, W) maps with masks."""
    maps, masks = [], []
    for level in zip(*per_image):
        height = max(x.shape[-2] for x in level)
        width = max(x.shape[-1] for x in level)
        out = level[0].new_zeros(len(level), level[0].shape[1], height, width)
        mask = torch.zeros(len(level), height, width, dtype=torch.bool, device=out.device)
        for i, x in enumerate(level):
            out[i, :, : x.shape[-2], : x.shape[-1]] = x[0]
            mask[i, : x.shape[-2], : x.shape[-1]] = True
        maps.append(out)
        masks.append(mask)
    return ImageFeatures(maps, masks)
