"""The mask decoder's two-way transformer: prompt tokens and image embedding attend to each other.

Each block runs self-attention of the tokens, the tokens attending to the image, an MLP on the
tokens and the image attending to the tokens; positions are added to queries and keys (not
values) at every attention, the first block's self-attention excepted. A last token-to-image
attention ends it. The same in the original (``sam2/modeling/sam/transformer.py``) and transformers
(``Sam2TwoWayTransformer``); names are the original's.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.sam2.common import MLP


class Attention(nn.Module):
    """Multi-head attention whose inner width is ``dim / downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: Tensor) -> Tensor:
        n, tokens, width = x.shape
        return x.reshape(n, tokens, self.num_heads, width // self.num_heads).transpose(1, 2)  # (N, heads, T, d)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(N, Tq, dim), (N, Tk, dim), (N, Tk, dim) -> (N, Tq, dim)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )  # (N, heads, Tq, d)
        n, _, tokens, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, tokens, -1))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention; each
    followed by a residual sum and a layer norm."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool) -> None:
        super().__init__()
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dim, 2)  # ReLU between (both references)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)

    def forward(self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (N, T, C) and image (N, HW, C), with their position encodings -> both updated."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # replaces the tokens (no residual)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token-to-image attention."""

    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Image (N, C, h, w), its encoding (N or 1, C, h, w) and tokens (N, T, C) -> tokens (N, T, C)
        and image (N, hw, C)."""
        keys = image.flatten(2).transpose(1, 2)  # (N, hw, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)  # (N or 1, hw, C)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
