"""The transformer feed-forward block with its residual, written to allocate as little as possible.

At the default resolution the encoder's hidden activation is ~22k x 2048 floats (180 MB) and
Swin's first stage's ~60k x 384. On CPU the block runs over row blocks, so those activations never
exist whole (a fresh buffer that size is page-faulted in on every use, and they set the peak memory
of the whole model). Under autograd on CPU (training) the hidden activation is not kept for the
backward either (``_RecomputedFFN``): the backward recomputes it block by block, one extra matmul
for ~1 GB less memory in a training step at 800x1333 (the saved hidden activations of the
encoder's and Swin's blocks). On a GPU (where each block would be a few small kernel launches),
under autocast, torch.compile and torch.export (the ONNX export, where the steps would fix the
graph to one input size) it runs in one piece with plain autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS_PER_STEP = 2048  # 2048 x 2048 floats = 16 MB of hidden activation at a time
# Rows per block in the training backward (16 MB temporaries, reused by the allocator: larger,
# freshly mapped blocks cost more in page faults than larger matmuls save).
BACKWARD_ROWS_PER_STEP = 2048


def _relu_(x: Tensor) -> Tensor:
    # In place on a tensor the block itself created, unless autograd records: in-place ops on a
    # Linear's (view) output make autograd copy and zero-fill the whole base in the backward.
    return F.relu(x, inplace=not torch.is_grad_enabled())


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
    grad = torch.is_grad_enabled()
    # Steps pay on CPU only; a compiled or exported graph must not bake the steps in.
    # (is_compiling first: comparing a symbolic row count would put a guard on the batch size).
    whole = torch.compiler.is_compiling() or x.device.type != "cpu" or torch.is_autocast_enabled(x.device.type)
    if not whole and grad and activation in _BACKWARDS and linear1.bias is not None and linear2.bias is not None:
        flat = x.reshape(rows, x.shape[-1])  # (N, D)
        out = _RecomputedFFN.apply(flat, linear1.weight, linear1.bias, linear2.weight, linear2.bias, activation)
        return residual + out.view(*x.shape[:-1], -1)
    if whole or grad or rows <= ROWS_PER_STEP:
        out = linear2(activation(linear1(x)))
        return out + residual if grad else out.add_(residual)
    flat = x.reshape(rows, x.shape[-1])  # (N, D)
    flat_residual = residual.reshape(rows, residual.shape[-1])  # (N, D)
    out = torch.empty_like(flat_residual)
    for start in range(0, rows, ROWS_PER_STEP):
        stop = start + ROWS_PER_STEP
        hidden = activation(linear1(flat[start:stop]))  # (n, hidden)
        torch.addmm(linear2.bias, hidden, linear2.weight.t(), out=out[start:stop])
        out[start:stop].add_(flat_residual[start:stop])
    return out.view_as(residual)


def _gelu_backward(grad: Tensor, pre: Tensor, hidden: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(grad, pre)


def _relu_backward(grad: Tensor, pre: Tensor, hidden: Tensor) -> Tensor:
    return torch.ops.aten.threshold_backward(grad, hidden, 0)


# The activations ``_RecomputedFFN`` knows the derivative of: (grad, pre-activation, activation) -> grad.
_BACKWARDS: dict[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    _relu_: _relu_backward,
    F.gelu: _gelu_backward,
}


class _RecomputedFFN(torch.autograd.Function):
    """``linear2(activation(linear1(x)))`` over row blocks, keeping only ``x`` for the backward,
    which recomputes each block's hidden activation (activation checkpointing of the block)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor,
        activation: Callable[[Tensor], Tensor],
    ) -> Tensor:
        """x: (N, D); w1: (H, D); b1: (H,); w2: (D', H); b2: (D',). Returns (N, D')."""
        out = x.new_empty(x.shape[0], w2.shape[0])
        for start in range(0, x.shape[0], ROWS_PER_STEP):
            stop = start + ROWS_PER_STEP
            hidden = activation(torch.addmm(b1, x[start:stop], w1.t()))  # (n, H)
            torch.addmm(b2, hidden, w2.t(), out=out[start:stop])
        ctx.activation = activation
        ctx.save_for_backward(x, w1, b1, w2)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        derivative = _BACKWARDS[ctx.activation]
        grad = grad.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w1 = torch.zeros_like(w1) if need_w1 else None
        grad_b1 = torch.zeros_like(b1) if need_b1 else None
        grad_w2 = torch.zeros_like(w2) if need_w2 else None
        grad_b2 = grad.sum(0) if need_b2 else None
        for start in range(0, x.shape[0], BACKWARD_ROWS_PER_STEP):
            stop = start + BACKWARD_ROWS_PER_STEP
            rows, g = x[start:stop], grad[start:stop]  # (n, D), (n, D')
            pre = torch.addmm(b1, rows, w1.t())  # (n, H)
            # relu runs in place on ``pre`` (its derivative needs only the output); gelu does not.
            hidden = ctx.activation(pre)
            if grad_w2 is not None:
                grad_w2.addmm_(g.t(), hidden)
            grad_pre = derivative(g @ w2, pre, hidden)  # (n, H)
            if grad_w1 is not None:
                grad_w1.addmm_(grad_pre.t(), rows)
            if grad_b1 is not None:
                grad_b1.add_(grad_pre.sum(0))
            if grad_x is not None:
                torch.mm(grad_pre, w1, out=grad_x[start:stop])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None
