"""SAM's mask decoder, and SAM-HQ's additions to it.

Learnt output tokens (an IoU token and ``num_multimask_outputs + 1`` mask tokens) go before the
prompt tokens into the two-way transformer, with the image embedding plus the dense prompt as the
image side. The image tokens are then upscaled 4x by two transposed convolutions, and each mask
token, through its own 3-layer MLP (a hypernetwork), gives the weights of a dot product over the
upscaled channels: one low-resolution mask (4g x 4g, 256 x 256 for the published models) per
token. The IoU token's MLP scores every mask. Mask 0 is the single-mask output, masks 1.. the
multi-mask outputs (the ambiguous cases).

SAM-HQ adds an HQ token (``hf_token``, with its MLP ``hf_mlp``) and HQ features: the image
embedding upscaled (``embedding_encoder``) plus the first global ViT block's features upscaled
(``compress_vit_feat``), added to a refined copy of the upscaled image tokens
(``embedding_maskfeature``). The HQ token's mask over those is added to the SAM mask kept (or
replaces it with ``hq_token_only``). Which multi-mask outputs are kept, and which image tokens are
upscaled, follow ``SamConfig.hq_multimask`` and ``hq_upscale_from`` (see ``config.REFERENCES``:
transformers' SAM-HQ differs from the original in both).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gdino.models.sam.common import MLP, LayerNorm2d
from gdino.models.sam.config import SamConfig
from gdino.models.sam.transformer import TwoWayTransformer


def _upscaling(dim: int) -> nn.Sequential:
    """(N, dim, h, w) -> (N, dim / 8, 4h, 4w): ``output_upscaling.0`` ... ``.4`` as in the original."""
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )


def _upscaling_hq(in_dim: int, mid: int, out: int) -> nn.Sequential:
    """SAM-HQ's 4x upscaling of a map: transposed conv, norm, GELU, transposed conv."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_dim, mid, kernel_size=2, stride=2),
        LayerNorm2d(mid),
        nn.GELU(),
        nn.ConvTranspose2d(mid, out, kernel_size=2, stride=2),
    )


def _refine_hq(dim: int) -> nn.Sequential:
    """SAM-HQ's refinement of the upscaled image tokens: 3x3 conv, norm, GELU, 3x3 conv."""
    return nn.Sequential(
        nn.Conv2d(dim // 8, dim // 4, kernel_size=3, padding=1),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.Conv2d(dim // 4, dim // 8, kernel_size=3, padding=1),
    )


def _masks(weights: Tensor, features: Tensor) -> Tensor:
    """Hypernetwork weights (N, K, c) over features (N, c, H, W) -> masks (N, K, H, W)."""
    n, c, h, w = features.shape
    return (weights @ features.view(n, c, h * w)).view(n, -1, h, w)


class MaskDecoder(nn.Module):
    """Image and prompt embeddings -> low-resolution mask logits and their predicted IoU."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim, n = config.prompt_dim, config.num_mask_tokens
        self.num_mask_tokens = n
        self.hq = config.hq
        self.hq_multimask = config.hq_multimask
        self.hq_upscale_from = config.hq_upscale_from
        self.transformer = TwoWayTransformer(config)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(n, dim)
        self.output_upscaling = _upscaling(dim)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(n))
        self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, n, config.iou_head_depth)
        if config.hq:
            self.hf_token = nn.Embedding(1, dim)
            self.hf_mlp = MLP(dim, dim, dim // 8, 3)
            self.compress_vit_feat = _upscaling_hq(config.vision.width, dim, dim // 8)
            self.embedding_encoder = _upscaling_hq(dim, dim // 4, dim // 8)
            self.embedding_maskfeature = _refine_hq(dim)

    def output_tokens(self) -> Tensor:
        """The IoU token, the mask tokens and (SAM-HQ) the HQ token: (1 + n (+ 1), dim)."""
        parts = [self.iou_token.weight, self.mask_tokens.weight] + ([self.hf_token.weight] if self.hq else [])
        return torch.cat(parts, dim=0)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool,
        hq_token_only: bool = False,
        early_features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Predicts the masks of every prompt.

        Args:
            image_embeddings: (B, dim, g, g).
            image_pe: (1, dim, g, g) the image's positional encoding.
            sparse: (B or 1, P, T, dim) prompt tokens.
            dense: (B or 1, 1 or P, dim, g, g) dense prompt embeddings.
            multimask_output: the multi-mask outputs (three) instead of the single mask.
            hq_token_only: SAM-HQ: the HQ mask alone instead of the SAM mask plus the HQ mask.
            early_features: SAM-HQ: (B, g, g, vit width), the first global ViT block's output.

        Returns:
            masks (B, P, K, 4g, 4g) logits and iou_scores (B, P, K).
        """
        b, p = image_embeddings.shape[0], sparse.shape[1]
        tokens = self.output_tokens().expand(b * p, -1, -1)  # (BP, n_out, dim)
        tokens = torch.cat([tokens, sparse.expand(b, -1, -1, -1).flatten(0, 1)], dim=1)  # (BP, n_out + T, dim)
        src = (image_embeddings[:, None] + dense).expand(b, p, -1, -1, -1).flatten(0, 1)  # (BP, dim, g, g)
        pos = image_pe.expand(b * p, -1, -1, -1)  # (BP, dim, g, g)
        hs, keys = self.transformer(src, pos, tokens)  # (BP, n_out + T, dim), (BP, g * g, dim)
        if self.hq and self.hq_upscale_from == "input_transposed":  # transformers' SAM-HQ; see config.REFERENCES
            decoded = src.transpose(2, 3)  # (BP, dim, g, g), height and width swapped
        else:
            decoded = keys.transpose(1, 2).reshape(src.shape)  # (BP, hw, dim) -> (BP, dim, g, g)
        upscaled = self.output_upscaling(decoded)  # (BP, dim / 8, 4g, 4g)
        mask_out = hs[:, 1 : 1 + self.num_mask_tokens]  # (BP, n, dim)
        weights = torch.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = _masks(weights, upscaled)  # (BP, n, 4g, 4g)
        iou = self.iou_prediction_head(hs[:, 0])  # (BP, n)
        if self.hq:
            if early_features is None:
                raise ValueError("SAM-HQ needs the early ViT features (intermediate_embeddings) with image_embeddings")
            hq_mask = self._hq_mask(hs[:, 1 + self.num_mask_tokens], upscaled, image_embeddings, early_features, p)
            masks, iou = self._select_hq(masks, hq_mask, iou, multimask_output, hq_token_only)
        else:
            keep = slice(1, None) if multimask_output else slice(0, 1)
            masks, iou = masks[:, keep], iou[:, keep]
        return masks.unflatten(0, (b, p)), iou.unflatten(0, (b, p))

    def _hq_mask(self, token: Tensor, upscaled: Tensor, image: Tensor, early: Tensor, prompts: int) -> Tensor:
        """SAM-HQ's mask: the HQ token (BP, dim) over the HQ features -> (BP, 1, 4g, 4g).

        The HQ features are per image (B, dim / 8, 4g, 4g), from the image embedding before the
        dense prompt is added, as in the original and in transformers.
        """
        features = self.embedding_encoder(image) + self.compress_vit_feat(early.permute(0, 3, 1, 2))
        features = features.repeat_interleave(prompts, dim=0)  # (BP, dim / 8, 4g, 4g)
        refined = self.embedding_maskfeature(upscaled) + features
        return _masks(self.hf_mlp(token)[:, None], refined)

    def _select_hq(
        self, masks: Tensor, hq_mask: Tensor, iou: Tensor, multimask: bool, hq_token_only: bool
    ) -> tuple[Tensor, Tensor]:
        """SAM-HQ's outputs: the SAM mask(s) kept, plus (or replaced by) the HQ mask."""
        if not multimask:
            masks, iou = masks[:, :1], iou[:, :1]
        elif self.hq_multimask == "best":  # the original: the best-scoring multi-mask output only
            iou, best = iou[:, 1:].max(dim=1, keepdim=True)  # (BP, 1)
            masks = masks[:, 1:].gather(1, best[:, :, None, None].expand(-1, -1, *masks.shape[2:]))
        else:  # transformers: all multi-mask outputs, best first
            iou, order = iou[:, 1:].sort(dim=1, descending=True)  # (BP, n - 1)
            masks = masks[:, 1:].gather(1, order[:, :, None, None].expand(-1, -1, *masks.shape[2:]))
        return (hq_mask if hq_token_only else masks + hq_mask), iou
