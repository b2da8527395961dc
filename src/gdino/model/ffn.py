"""The transformer feed-forward block with its residual, written to allocate as little as possible.

At the default resolution the encoder's hidden activation is ~22k x 2048 floats (180 MB) and
Swin's first stage's ~60k x 384. Without autograd, on CPU, the block runs over row blocks, so
those activations never exist whole (a fresh buffer that size is page-faulted in on every use,
and they set the peak memory of the whole model); with autograd, or on a GPU (where each block
would be a few small kernel launches), it runs in one piece; so it does under torch.compile and
torch.export (the ONNX export), where the steps would fix the graph to one input size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS_PER_STEP = 2048  # 2048 x 2048 floats = 16 MB of hidden activation at a time


def _relu_(x: Tensor) -> Tensor:
    return F.relu(x, inplace=True)  # on a tensor the block itself created


def residual_ffn(
    x: Tensor,
    linear1: nn.Linear,
    linear2: nn.Linear,
    activation: Callable[[Tensor], Tensor] = _relu_,
    residual: Tensor | None = None,
) -> Tensor:
    """``residual + linear2(activation(linear1(x)))`` for ``x`` (..., D); ``residual`` defaults to ``x``."""
    residual = x if residual is None else residual
    rows = x.numel() // x.shape[-1]
    # Steps pay on CPU only; a compiled or exported graph must not bake the steps in.
    # (is_compiling first: comparing a symbolic row count would put a guard on the batch size).
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or rows <= ROWS_PER_STEP or x.device.type != "cpu":
        return linear2(activation(linear1(x))).add_(residual)
    flat = x.reshape(rows, x.shape[-1])  # (N, D)
    flat_residual = residual.reshape(rows, residual.shape[-1])  # (N, D)
    out = torch.empty_like(flat_residual)
    for start in range(0, rows, ROWS_PER_STEP):
        stop = start + ROWS_PER_STEP
        hidden = activation(linear1(flat[start:stop]))  # (n, hidden)
        torch.addmm(linear2.bias, hidden, linear2.weight.t(), out=out[start:stop])
        out[start:stop].add_(flat_residual[start:stop])
    return out.view_as(residual)
