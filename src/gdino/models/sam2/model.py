"""``Sam2``: the SAM 2.1 image model, as the original ``SAM2ImagePredictor`` runs it.

``encode_image`` runs the image encoder once per image: the three feature maps, ``conv_s0`` and
``conv_s1`` applied to the two high-resolution ones (as ``SAM2Base.forward_image`` does, once per
image rather than once per prompt), and the no-memory embedding added to the image embedding (the
predictor's ``directly_add_no_mem_embed``: the video model conditions that map on memories, an
image has none). ``decode`` then turns any number of prompts into masks against those embeddings,
so several prompts (or batches of them) reuse one image encoding.

Coordinates are pixels of the model's square input: the image resized (not padded) to
``image_size`` x ``image_size``, x then y. Masks come out as logits at 4x the image embedding
(256 x 256 for 1024), before any resizing back to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam2.config import Sam2Config
from gdino.models.sam2.image_encoder import ImageEncoder
from gdino.models.sam2.mask_decoder import MaskDecoder
from gdino.models.sam2.prompt_encoder import PromptEncoder


@dataclass(frozen=True)
class ImageEmbeddings:
    """One encoding per image, for ``Sam2.decode``.

    Attributes:
        image_embed: (B, C, e, e), e = image_size / 16, the no-memory embedding added.
        high_res_feats: (B, C/8, 4e, 4e) and (B, C/4, 2e, 2e), after conv_s0 and conv_s1.
    """

    image_embed: Tensor
    high_res_feats: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Sam2Output:
    """P prompts' masks for each of B images (transformers' ``Sam2ImageSegmentationOutput`` names).

    Attributes:
        pred_masks: (B, P, M, 4e, 4e) mask logits, M = 3 with multi-mask output, else 1.
        iou_scores: (B, P, M), each mask's predicted IoU, in [0, 1].
        object_score_logits: (B, P, 1), whether the prompt's object is in the image (> 0: yes).
    """

    pred_masks: Tensor
    iou_scores: Tensor
    object_score_logits: Tensor


class Sam2(nn.Module):
    """Image encoder, prompt encoder and mask decoder, named as the original's ``SAM2Base``."""

    def __init__(self, config: Sam2Config) -> None:
        super().__init__()
        config.check()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.sam_prompt_encoder = PromptEncoder(
            config.d_model, config.embedding_size, config.image_size, config.mask_in_chans
        )
        self.sam_mask_decoder = MaskDecoder(config.d_model, config.decoder)
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, config.d_model))

    def encode_image(self, pixel_values: Tensor) -> ImageEmbeddings:
        """(B, 3, S, S) normalised pixels, S = ``config.image_size`` -> the image's embeddings."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (self.config.hiera.in_channels, s, s):
            raise ValueError(
                f"pixel_values must be (B, {self.config.hiera.in_channels}, {s}, {s}): the image resized to the "
                f"model's square input; got {tuple(pixel_values.shape)}"
            )
        feat_s0, feat_s1, image = self.image_encoder(pixel_values)
        decoder = self.sam_mask_decoder
        image = image + self.no_mem_embed.reshape(1, -1, 1, 1)  # (B, C, e, e)
        return ImageEmbeddings(image, (decoder.conv_s0(feat_s0), decoder.conv_s1(feat_s1)))

    def decode(
        self,
        embeddings: ImageEmbeddings,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> Sam2Output:
        """Masks for P prompts per image; a prompt is points, a box, both, and optionally a mask.

        Args:
            embeddings: ``encode_image``'s, for B images.
            point_coords: (B, P, N, 2) pixel coordinates (x, y) in the model's input.
            point_labels: (B, P, N): 1 positive, 0 negative, -1 padding (2 and 3 box corners).
            boxes: (B, P, 4) x0 y0 x1 y1 in pixels of the model's input, one box per prompt.
            mask_input: (B, P or 1, H, W) mask logits (a previous ``pred_masks``), one per prompt or
                one for all of an image's prompts; resized to 4e x 4e when of another size.
            multimask_output: three masks per prompt (else one).

        With neither points nor boxes, each image has one prompt (P = 1, or the masks' P) of a
        single padding point, as the original does for a mask alone or no prompt at all.
        """
        image = embeddings.image_embed
        coords, labels, p = self._prompt_points(image.shape[0], point_coords, point_labels, boxes, mask_input)
        encoder = self.sam_prompt_encoder
        sparse = encoder.embed_points(coords, labels).unflatten(0, (image.shape[0], p))  # (B, P, T, C)
        dense = self._dense(mask_input, image.shape[0], p)  # (B, P or 1, C, e or 1, e or 1)
        masks, iou, obj = self.sam_mask_decoder(
            image, encoder.dense_pe(), sparse, dense, embeddings.high_res_feats, multimask_output
        )
        return Sam2Output(masks, iou, obj)

    def forward(
        self,
        pixel_values: Tensor,
        point_coords: Tensor | None = None,
        point_labels: Tensor | None = None,
        boxes: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = True,
    ) -> Sam2Output:
        """``decode(encode_image(pixel_values), ...)``."""
        return self.decode(
            self.encode_image(pixel_values), point_coords, point_labels, boxes, mask_input, multimask_output
        )

    def _prompt_points(
        self,
        batch: int,
        coords: Tensor | None,
        labels: Tensor | None,
        boxes: Tensor | None,
        mask_input: Tensor | None,
    ) -> tuple[Tensor, Tensor, int]:
        """Every prompt's points, box corners first (the image predictor's order): (B * P, N, 2) and
        (B * P, N), and P."""
        if (coords is None) != (labels is None):
            raise ValueError("point_coords and point_labels go together: give both or neither")
        p = _prompts(batch, coords, labels, boxes)
        if p is None:  # no point and no box: one padding point a prompt, as SAM2Base._forward_sam_heads does
            p = mask_input.shape[1] if mask_input is not None and mask_input.ndim == 4 else 1
            device = self.no_mem_embed.device
            coords = torch.zeros(batch, p, 1, 2, device=device)
            labels = torch.full((batch, p, 1), -1, dtype=torch.long, device=device)
        flat_boxes = boxes.reshape(-1, 4) if boxes is not None else None
        flat_coords = coords.flatten(0, 1) if coords is not None else None
        flat_labels = labels.flatten(0, 1) if labels is not None else None
        points, point_labels = self.sam_prompt_encoder.embed_boxes_and_points(flat_boxes, flat_coords, flat_labels)
        return points, point_labels, p

    def _dense(self, mask_input: Tensor | None, batch: int, p: int) -> Tensor:
        """The dense prompt: each mask's embedding (B, P or 1, C, e, e), or the no-mask embedding (1, 1, C, 1, 1)."""
        encoder = self.sam_prompt_encoder
        if mask_input is None:
            return encoder.no_mask()[None]
        if mask_input.ndim != 4 or mask_input.shape[0] != batch or mask_input.shape[1] not in (1, p):
            raise ValueError(f"mask_input must be (B={batch}, P={p} or 1, H, W), got {tuple(mask_input.shape)}")
        size = encoder.mask_input_size
        masks = mask_input.flatten(0, 1)[:, None]  # (B * P, 1, H, W)
        if masks.shape[-2:] != (size, size):
            # As SAM2Base._forward_sam_heads (and transformers) resize a mask of another size, in float32.
            masks = F.interpolate(
                masks.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        return encoder.embed_masks(masks.to(self.no_mem_embed.dtype)).unflatten(0, (batch, -1))


def _prompts(batch: int, coords: Tensor | None, labels: Tensor | None, boxes: Tensor | None) -> int | None:
    """The number of prompts per image the points and boxes give (None: neither is given); refuses
    shapes that disagree."""
    p: int | None = None
    if coords is not None and labels is not None:
        if coords.ndim != 4 or coords.shape[-1] != 2 or coords.shape[0] != batch:
            raise ValueError(f"point_coords must be (B={batch}, P, N, 2), got {tuple(coords.shape)}")
        if tuple(labels.shape) != tuple(coords.shape[:3]):
            raise ValueError(
                f"point_labels must be {tuple(coords.shape[:3])} to match point_coords, got {tuple(labels.shape)}"
            )
        p = coords.shape[1]
    if boxes is not None:
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch:
            raise ValueError(f"boxes must be (B={batch}, P, 4), got {tuple(boxes.shape)}")
        if p is not None and boxes.shape[1] != p:
            raise ValueError(f"point_coords give {p} prompts per image but boxes {boxes.shape[1]}: one box per prompt")
        p = boxes.shape[1]
    return p
