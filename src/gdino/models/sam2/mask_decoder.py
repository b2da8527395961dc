"""The mask decoder: masks, their IoU scores and an object score from the prompt tokens.

Output tokens (object score, IoU, ``num_multimask_outputs + 1`` mask tokens) are put before the
prompt's tokens and run through the two-way transformer with the image embedding (plus the dense
prompt). The image embedding is then upsampled 4x by two transposed convolutions, adding the
high-resolution features (``conv_s1`` of the stride-8 map after the first, ``conv_s0`` of the
stride-4 map after the second); each mask token's MLP gives the weights of a dot product with
every upsampled cell, one mask each. Mask 0 is the single-mask output, masks 1..3 the multi-mask
output; with single-mask output, an unstable mask 0 is replaced by the best-scored of 1..3 (in
eval mode, as both references do).

The original (``sam2/modeling/sam/mask_decoder.py``) and transformers (``Sam2MaskDecoder``) compute
the same; names are the original's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gdino.models.sam2.common import MLP, LayerNorm2d
from gdino.models.sam2.config import MaskDecoderConfig
from gdino.models.sam2.transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Image embedding, high-resolution features and prompt embeddings -> mask logits and scores."""

    def __init__(self, dim: int, config: MaskDecoderConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.num_mask_tokens = c.num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(c.depth, dim, c.num_heads, c.mlp_dim, c.attention_downsample_rate)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.obj_score_token = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)  # applied once per image, in Sam2.encode_image
        self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(
            dim, c.iou_head_hidden_dim, self.num_mask_tokens, c.iou_head_depth, sigmoid_output=True
        )
        self.pred_obj_score_head = MLP(dim, dim, 1, 3)

    def forward(
        self,
        image_embed: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        high_res: tuple[Tensor, Tensor],
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Decodes P prompts per image.

        Args:
            image_embed: (B, C, e, e), the no-memory embedding added.
            image_pe: (1, C, e, e), the prompt encoder's dense position encoding.
            sparse: (B, P, T, C), each prompt's tokens.
            dense: (B, P or 1, C, e or 1, e or 1), each prompt's (or every prompt's) dense embedding.
            high_res: the stride-4 and stride-8 features after conv_s0 and conv_s1, (B, C/8, 4e, 4e)
                and (B, C/4, 2e, 2e).
            multimask_output: masks 1..3 (else one mask).

        Returns:
            Mask logits (B, P, M, 4e, 4e), IoU scores (B, P, M) and object-score logits (B, P, 1);
            M is 3 with ``multimask_output``, else 1.
        """
        b, p, _, dim = sparse.shape
        e = image_embed.shape[-1]
        src = (image_embed[:, None] + dense).expand(b, p, dim, e, e).flatten(0, 1)  # (B * P, C, e, e)
        masks, iou, obj = self.predict_masks(src, image_pe, sparse.flatten(0, 1), high_res)
        masks, iou = self.select(masks, iou, multimask_output)
        return masks.unflatten(0, (b, p)), iou.unflatten(0, (b, p)), obj.unflatten(0, (b, p))

    def predict_masks(
        self, src: Tensor, image_pe: Tensor, sparse: Tensor, high_res: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """All mask tokens' masks (N, M + 1, 4e, 4e), IoU scores (N, M + 1) and object scores (N, 1),
        N = B * P prompts (``src``, ``sparse``), B images (``high_res``)."""
        n, dim, h, w = src.shape
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(n, -1, -1), sparse], dim=1)  # (N, 2 + M + 1 + T, C)
        hs, keys = self.transformer(src, image_pe, tokens)
        upscaled = self._upscale(keys.transpose(1, 2).reshape(n, dim, h, w), high_res)  # (N, C/8, 4e, 4e)
        hyper = torch.stack(
            [mlp(hs[:, 2 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (N, M + 1, C/8)
        masks = (hyper @ upscaled.flatten(2)).view(n, -1, *upscaled.shape[-2:])  # (N, M + 1, 4e, 4e)
        return masks, self.iou_prediction_head(hs[:, 1]), self.pred_obj_score_head(hs[:, 0])

    def _upscale(self, src: Tensor, high_res: tuple[Tensor, Tensor]) -> Tensor:
        """(N, C, e, e) -> (N, C/8, 4e, 4e), adding each image's high-resolution features to its prompts' maps."""
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res
        x = act1(norm(_add_per_image(conv1(src), feat_s1)))  # (N, C/4, 2e, 2e)
        return act2(_add_per_image(conv2(x), feat_s0))

    def select(self, masks: Tensor, iou: Tensor, multimask_output: bool) -> tuple[Tensor, Tensor]:
        """Masks 1..M, or mask 0 (falling back to the best of 1..M when unstable, in eval mode)."""
        if multimask_output:
            return masks[:, 1:], iou[:, 1:]
        if self.config.dynamic_multimask_via_stability and not self.training:
            return self._dynamic_multimask(masks, iou)
        return masks[:, :1], iou[:, :1]

    def stability_scores(self, mask_logits: Tensor) -> Tensor:
        """(N, K, H, W) -> (N, K): the IoU of the mask thresholded at +delta and at -delta (1 when both are empty)."""
        delta = self.config.dynamic_multimask_stability_delta
        flat = mask_logits.flatten(-2)
        inner = (flat > delta).sum(-1).float()
        outer = (flat > -delta).sum(-1).float()
        return torch.where(outer > 0, inner / outer, 1.0)

    def _dynamic_multimask(self, masks: Tensor, iou: Tensor) -> tuple[Tensor, Tensor]:
        best = iou[:, 1:].argmax(-1) + 1  # (N,) the best multi-mask output
        rows = torch.arange(masks.shape[0], device=masks.device)
        best_masks, best_iou = masks[rows, best][:, None], iou[rows, best][:, None]  # (N, 1, H, W), (N, 1)
        stable = self.stability_scores(masks[:, :1]) >= self.config.dynamic_multimask_stability_thresh  # (N, 1)
        return torch.where(stable[..., None, None], masks[:, :1], best_masks), torch.where(stable, iou[:, :1], best_iou)


def _add_per_image(x: Tensor, feature: Tensor) -> Tensor:
    """x (B * P, C, H, W) + feature (B, C, H, W), each image's feature added to its P prompts' maps."""
    return (x.unflatten(0, (feature.shape[0], -1)) + feature[:, None]).flatten(0, 1)
