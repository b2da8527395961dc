"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Each block runs (1) self-attention of the tokens, (2) tokens -> image cross-attention, (3) an MLP
on the tokens and (4) image -> tokens cross-attention, each followed by a residual and a norm;
positional encodings (the tokens' own embedding, the image's dense encoding) are added to queries
and keys at every attention, never to values. The first block's self-attention takes no positional
encoding and no residual. A final tokens -> image attention and norm end it.

Cross-attentions project to ``prompt_dim / attention_downsample_rate`` channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam.common import MLPBlock
from gdino.models.sam.config import SamConfig

# The final norm is ``nn.LayerNorm(dim)`` in the original and in transformers alike.
_FINAL_NORM_EPS = 1e-5


class Attention(nn.Module):
    """Multi-head attention whose queries, keys and values are projected to ``dim / downsample``."""

    def __init__(self, dim: int, num_heads: int, downsample: int = 1) -> None:
        super().__init__()
        internal = dim // downsample
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, nh, N, c / nh)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, Nq, dim), (B, Nk, dim), (B, Nk, dim) -> (B, Nq, dim)."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, Nq, c / nh); softmax(q k^T / sqrt(c / nh)) v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, Nq, internal) -> (B, Nq, dim)


class TwoWayAttentionBlock(nn.Module):
    """One block of the two-way transformer (see the module docstring)."""

    def __init__(self, config: SamConfig, skip_first_layer_pe: bool) -> None:
        super().__init__()
        dim, heads, eps = config.prompt_dim, config.decoder_heads, config.decoder_norm_eps
        rate = config.attention_downsample_rate
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_token_to_image = Attention(dim, heads, rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, config.decoder_mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_image_to_token = Attention(dim, heads, rate)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """queries (B, T, dim) and keys (B, HW, dim) with their encodings -> the updated pair."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``decoder_depth`` two-way blocks and a final tokens -> image attention."""

    def __init__(self, config: SamConfig) -> None:
        super().__init__()
        dim = config.prompt_dim
        self.layers = nn.ModuleList(TwoWayAttentionBlock(config, i == 0) for i in range(config.decoder_depth))
        self.final_attn_token_to_image = Attention(dim, config.decoder_heads, config.attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim, eps=_FINAL_NORM_EPS)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Runs the blocks.

        Args:
            image: (B, dim, h, w) image embedding (plus the dense prompt).
            image_pe: (B, dim, h, w) its positional encoding.
            tokens: (B, T, dim) output and prompt tokens, which are also their own positional encoding.

        Returns:
            The tokens (B, T, dim) and the image tokens (B, h * w, dim).
        """
        keys = image.flatten(2).transpose(1, 2)  # (B, hw, dim)
        key_pe = image_pe.flatten(2).transpose(1, 2)  # (B, hw, dim)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + attn), keys
