"""Multi-head attention with one packed input projection.

Parameter names follow ``torch.nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj``), which is how the original checkpoint stores the text self-attention, the decoder's
self-attention and its text cross-attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """``F.scaled_dot_product_attention``, written out while torch.export traces (the ONNX export).

    The fused kernel's output layout differs between torch.export's trace and its decomposition,
    which breaks the reshapes that follow; the written-out form has one layout. A bool mask is
    True where a query may attend a key; a float mask is added to the logits.
    """
    if not torch.compiler.is_exporting():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    logits = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-1, -2)
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return logits.softmax(-1) @ v


class MultiheadAttention(nn.Module):
    """Scaled dot-product attention over ``num_heads`` heads, batch first."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, h, N, d/h)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None) -> Tensor:
        """Attends ``query`` (B, Q, D) to ``key``/``value`` (B, K, D).

        Args:
            allowed: boolean mask broadcastable to (B, heads, Q, K), True where a query may attend
                a key; None attends everywhere. Every query must be allowed at least one key.

        Returns:
            (B, Q, D)
        """
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key:  # self-attention with a shared position embedding: one matmul for q and k
            q, k = F.linear(query, torch.cat([w_q, w_k]), torch.cat([b_q, b_k])).chunk(2, -1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        out = attend(self._heads(q), self._heads(k), self._heads(v), allowed)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, Q, D)
