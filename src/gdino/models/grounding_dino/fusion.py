"""Image-text fusion: one bi-directional cross-attention between image and text tokens.

Image tokens attend to text tokens and text tokens attend to image tokens through one shared
matrix of attention logits (computed once, softmax-normalised along each of its two axes). Each
side is then added, scaled by a learned per-channel gamma, to its layer-normalised input. The
products are re-associated so that the ~22k image tokens are never widened to the attention's
inner width (see `BiAttention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The logits are clamped to this range after subtracting their maximum (as the original does, for
# half precision). A row far below the maximum therefore becomes a uniform distribution.
_LOGIT_CLAMP = 50000.0


class BiAttention(nn.Module):
    """Cross-attention in both directions, image -> text and text -> image, re-associated.

    Mathematically the module computes, per head h (head width E/h, ``scale = (E/h)^-0.5``), with
    image tokens x (S, D) and text tokens y (T, D):

        Q^h = x W_q^h^T + b_q^h,        K^h = y W_k^h^T + b_k^h          (v_proj, l_proj)
        V_v^h = x W_vv^h^T + b_vv^h,    V_l^h = y W_vl^h^T + b_vl^h      (values_v_proj, values_l_proj)
        A^h = scale Q^h K^h^T                                            (S, T) attention logits
        image update = [P^h V_l^h]_h W_o^T + b_o                         P^h: softmax of A^h over T
        text update  = out_l_proj([P_l^h V_v^h]_h)                       P_l^h: softmax of A^h^T over S

    with the reference's handling of the logits (see `_stabilise` and `_softmax_over_image`).
    Computed as written, each of the S image tokens (~22k) is widened to E = 1024 three times: Q, V_v
    and the input of out_v_proj. There are only a few text tokens (T, h*T << E), so every product is
    re-associated so that the image tokens meet the text side at width D, before anything is widened:

        A^h = x (scale W_q^h^T K^h^T) + scale b_q^h K^h^T        a (D, h*T) matrix, once per image
        image update = sum_h P^h (V_l^h W_o^h^T + b_o / h)      W_o^h: the head's E/h columns of W_o
        P_l^h V_v^h = (P_l^h x) W_vv^h^T + b_vv^h

    The last two use that softmax rows sum to 1 (sum_t P^h[s, t] = 1, sum_s P_l^h[t, s] = 1): masked
    (padding) tokens get probability exactly 0 and the rows still sum to 1. Per image this costs
    three (S, D) x (D, h*T) products instead of three (S, D) x (D, E) products plus the attention's
    own, and no (S, E) tensor exists; the largest intermediate is the logits, (h*T, S), as in the
    reference. They are kept text-major, (B, h, T, S), where both softmaxes run along long rows.
    The parameters (and so the checkpoint layout) are unchanged.

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

    def _text_heads(self, x: Tensor) -> Tensor:
        b, t, e = x.shape
        return x.view(b, t, self.num_heads, e // self.num_heads).transpose(1, 2)  # (B, h, T, E/h)

    def _logits(self, vision: Tensor, text: Tensor) -> Tensor:
        """(B, S, D), (B, T, D) -> logits A^T (B, h, T, S): (scale K^h W_q^h) x^T + scale K^h b_q^h."""
        b, t, d = text.shape
        h = self.num_heads
        keys = self._text_heads(self.l_proj(text)) * self.scale  # (B, h, T, E/h): scale K^h
        w_q = self.v_proj.weight.view(h, -1, d)  # (h, E/h, D): W_q^h
        keys_in_d = (keys @ w_q).view(b, h * t, d)  # (B, h*T, D): scale K^h W_q^h
        bias = (keys @ self.v_proj.bias.view(h, -1, 1)).view(b, h * t, 1)  # (B, h*T, 1): scale K^h b_q^h
        logits = torch.baddbmm(bias, keys_in_d, vision.transpose(1, 2))  # (B, h*T, S)
        return logits.view(b, h, t, -1)

    def _vision_update(self, logits: Tensor, text: Tensor, text_padding_mask: Tensor | None) -> Tensor:
        """Logits (B, h, T, S) -> image update (B, S, D) = sum_h P^h (V_l^h W_o^h^T + b_o / h)."""
        b, h, t, s = logits.shape
        if text_padding_mask is not None:
            logits = logits.masked_fill(text_padding_mask[:, None, :, None], float("-inf"))
        probs = logits.softmax(2).view(b, h * t, s)  # (B, h*T, S): P^h^T, softmax over the text tokens
        values = self._text_heads(self.values_l_proj(text))  # (B, h, T, E/h): V_l^h
        d = self.out_v_proj.out_features
        w_out = self.out_v_proj.weight.view(d, h, -1).permute(1, 2, 0)  # (h, E/h, D): W_o^h^T
        values_out = (values @ w_out + self.out_v_proj.bias / h).view(b, h * t, d)  # (B, h*T, D)
        return probs.transpose(1, 2) @ values_out  # (B, S, D)

    def _text_update(self, logits: Tensor, vision: Tensor, vision_padding_mask: Tensor | None) -> Tensor:
        """Logits (B, h, T, S) -> text update (B, T, D) = out_l_proj([(P_l^h x) W_vv^h^T + b_vv^h]_h)."""
        b, h, t, s = logits.shape
        probs = _softmax_over_image(logits, vision_padding_mask).view(b, h * t, s)  # (B, h*T, S): P_l^h
        pooled = (probs @ vision).view(b, h, t, -1)  # (B, h, T, D): P_l^h x
        d = vision.shape[-1]
        w_vv = self.values_v_proj.weight.view(h, -1, d).transpose(1, 2)  # (h, D, E/h): W_vv^h^T
        values = pooled @ w_vv + self.values_v_proj.bias.view(h, 1, -1)  # (B, h, T, E/h): P_l^h V_v^h
        return self.out_l_proj(values.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)

    def forward(
        self, vision: Tensor, text: Tensor, vision_padding_mask: Tensor | None, text_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Image tokens (B, S, D) and text tokens (B, T, D) -> their updates (B, S, D), (B, T, D).

        Args:
            vision_padding_mask: (B, S), True at image padding (text tokens do not attend to it), or None.
            text_padding_mask: (B, T), True at text padding (image tokens do not attend to it), or None.
        """
        logits = _stabilise(self._logits(vision, text))  # (B, h, T, S), computed once for both directions
        return (
            self._vision_update(logits, text, text_padding_mask),
            self._text_update(logits, vision, vision_padding_mask),
        )


def _stabilise(logits: Tensor) -> Tensor:
    """Subtracts ONE maximum over the whole batch, all heads, padding included, then clamps: as the reference."""
    return (logits - logits.max()).clamp_(-_LOGIT_CLAMP, _LOGIT_CLAMP)


def _softmax_over_image(logits: Tensor, vision_padding_mask: Tensor | None) -> Tensor:
    """Logits (B, h, T, S) -> their softmax over the image tokens S, as the reference computes it.

    Each (head, text token) row subtracts its own maximum over S (padding included) and clamps
    again; image padding is then masked out, so it gets probability exactly 0.
    """
    logits = (logits - logits.amax(-1, keepdim=True)).clamp_(-_LOGIT_CLAMP, _LOGIT_CLAMP)
    if vision_padding_mask is not None:
        logits.masked_fill_(vision_padding_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


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
        return torch.addcmul(vision, self.gamma_v, delta_v), torch.addcmul(text, self.gamma_l, delta_l)
