"""Image-text fusion: one bi-directional cross-attention between image and text tokens.

Image tokens attend to text tokens and text tokens attend to image tokens through one shared
matrix of attention logits (computed once, used as is and transposed). Each side is then added,
scaled by a learned per-channel gamma, to its layer-normalised input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The logits are clamped to this range after subtracting their maximum (as the original does, for
# half precision). A row far below the maximum therefore becomes a uniform distribution.
_LOGIT_CLAMP = 50000.0


class BiAttention(nn.Module):
    """Cross-attention in both directions, image -> text and text -> image.

    Args:
        dim: width D of the image and text tokens.
        embed_dim: inner width E of the attention (split into heads).
        num_heads: number of heads h.
    """

    def __init__(self, dim: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (embed_dim // num_heads) ** -0.5
        self.v_proj = nn.Linear(dim, embed_dim)
        self.l_proj = nn.Linear(dim, embed_dim)
        self.values_v_proj = nn.Linear(dim, embed_dim)
        self.values_l_proj = nn.Linear(dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, dim)
        self.out_l_proj = nn.Linear(embed_dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, e = x.shape
        return x.view(b, n, self.num_heads, e // self.num_heads).transpose(1, 2)  # (B, h, N, E/h)

    def _merge(self, x: Tensor) -> Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, -1)  # (B, N, E)

    def forward(
        self, vision: Tensor, text: Tensor, vision_padding_mask: Tensor | None, text_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Image tokens (B, S, D) and text tokens (B, T, D) -> their updates (B, S, D), (B, T, D).

        Args:
            vision_padding_mask: (B, S), True at image padding (text tokens do not attend to it), or None.
            text_padding_mask: (B, T), True at text padding (image tokens do not attend to it), or None.
        """
        q = self._heads(self.v_proj(vision) * self.scale)  # (B, h, S, E/h)
        k = self._heads(self.l_proj(text))  # (B, h, T, E/h)
        logits = q @ k.transpose(-1, -2)  # (B, h, S, T)
        # One maximum over the whole batch, all heads, padding included: as the reference.
        logits = (logits - logits.max()).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        text_logits = logits.transpose(-1, -2)  # (B, h, T, S)
        text_logits = (text_logits - text_logits.amax(-1, keepdim=True)).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        if vision_padding_mask is not None:
            text_logits = text_logits.masked_fill(vision_padding_mask[:, None, None, :], float("-inf"))
        if text_padding_mask is not None:
            logits = logits.masked_fill(text_padding_mask[:, None, None, :], float("-inf"))
        vision_out = logits.softmax(-1) @ self._heads(self.values_l_proj(text))  # (B, h, S, E/h)
        text_out = text_logits.softmax(-1) @ self._heads(self.values_v_proj(vision))  # (B, h, T, E/h)
        return self.out_v_proj(self._merge(vision_out)), self.out_l_proj(self._merge(text_out))


class FusionLayer(nn.Module):
    """Pre-norm bi-attention with layer scale: x <- norm(x) + gamma * attention(norm(x), norm(y)).

    Note that the residual is the normalised input, not the input.

    Args:
        dim: width D of the image and text tokens.
        embed_dim: inner width of the attention.
        num_heads: number of heads.
        eps: layer-norm epsilon.
    """

    def __init__(self, dim: int, embed_dim: int, num_heads: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(dim, eps)
        self.layer_norm_l = nn.LayerNorm(dim, eps)
        self.attn = BiAttention(dim, embed_dim, num_heads)
        self.gamma_v = nn.Parameter(torch.full((dim,), 1e-4))
        self.gamma_l = nn.Parameter(torch.full((dim,), 1e-4))

    def forward(
        self,
        vision: Tensor,
        text: Tensor,
        vision_padding_mask: Tensor | None = None,
        text_padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Image tokens (B, S, D) and text tokens (B, T, D) -> fused (B, S, D), (B, T, D).

        Args:
            vision_padding_mask: (B, S), True at image padding, or None.
            text_padding_mask: (B, T), True at text padding, or None.
        """
        vision, text = self.layer_norm_v(vision), self.layer_norm_l(text)
        delta_v, delta_l = self.attn(vision, text, vision_padding_mask, text_padding_mask)
        return vision + self.gamma_v * delta_v, text + self.gamma_l * delta_l
