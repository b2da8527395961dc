"""Prediction heads: the MLP box head, the contrastive class head and box refinement.

Grounding DINO's class head has no parameters: a query's logit for a token is the dot product of
the two embeddings. MM-Grounding-DINO's (and LLMDet's) divides it by sqrt(d_model) and adds a
learnt scalar bias (``ClassHead(scaled=True)``). Boxes are ``(cx, cy, w, h)`` in ``[0, 1]``; a
box head predicts a delta in logit space that refines a reference box.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# transformers' clamp of the reference box before taking its logit. The original repository's
# ``inverse_sigmoid`` uses 1e-3 and clamps differently (see ``box_logit``); the configuration
# chooses (``GroundingDinoConfig.box_logit_eps`` and ``box_logit_original``).
BOX_LOGIT_EPS = 1e-5


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """Maps (..., input_dim) to (..., output_dim)."""
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < last:
                x = F.relu(x)
        return x


def contrastive_logits(
    queries: Tensor, text: Tensor, text_padding_mask: Tensor, max_text_len: int, bias: Tensor | None = None
) -> Tensor:
    """Class logits of every query for every text token.

    Args:
        queries: (B, Q, D) decoder hidden states.
        text: (B, T, D) encoded text tokens, T <= max_text_len.
        text_padding_mask: (B, T) bool, True where the token is padding.
        max_text_len: width of the output; the columns past T are -inf.
        bias: MM-Grounding-DINO's learnt scalar: the dot products are divided by sqrt(D) and
            ``bias`` is added; None: the plain dot products (Grounding DINO).

    Returns:
        (B, Q, max_text_len) logits, -inf on padding tokens and past the text.
    """
    length = text.shape[1]
    if length > max_text_len:
        raise ValueError(f"text has {length} tokens, more than max_text_len={max_text_len}")
    logits = queries @ text.transpose(-1, -2)  # (B, Q, T)
    if bias is not None:
        logits = logits / math.sqrt(queries.shape[-1]) + bias
    logits = logits.masked_fill(text_padding_mask[:, None, :], float("-inf"))
    return F.pad(logits, (0, max_text_len - length), value=float("-inf"))  # (B, Q, max_text_len)


class ClassHead(nn.Module):
    """The contrastive class head: ``contrastive_logits``, with MM-Grounding-DINO's learnt bias if ``scaled``."""

    bias: nn.Parameter | None

    def __init__(self, scaled: bool = False) -> None:
        super().__init__()
        # transformers initialises the bias to -log((1 - 0.01) / 0.01), a prior of 0.01
        self.bias = nn.Parameter(torch.tensor(-math.log(99.0))) if scaled else None

    def forward(self, queries: Tensor, text: Tensor, text_padding_mask: Tensor, max_text_len: int) -> Tensor:
        """(B, Q, D) queries, (B, T, D) text -> (B, Q, max_text_len) logits (see ``contrastive_logits``)."""
        return contrastive_logits(queries, text, text_padding_mask, max_text_len, self.bias)


def per_layer(heads: nn.Module, layers: int) -> list[nn.Module]:
    """The head of each decoder layer: a ``ModuleList`` holds one per layer, a single module is shared."""
    return list(heads) if isinstance(heads, nn.ModuleList) else [heads] * layers


def box_logit(x: Tensor, eps: float = BOX_LOGIT_EPS, original: bool = False) -> Tensor:
    """The logit of boxes in ``[0, 1]``, kept finite at 0 and 1, in one of two arithmetics.

    Args:
        x: (..., 4) boxes.
        eps: how close to 0 and 1 the logit's argument may come.
        original: False: transformers' ``torch.special.logit(x, eps)``, which clamps ``x`` to
            ``[eps, 1 - eps]`` before ``log(x / (1 - x))``. True: the original repository's
            ``inverse_sigmoid``, which clamps ``x`` to ``[0, 1]``, then the numerator ``x`` and
            the denominator ``1 - x`` each to at least ``eps``, and returns ``log(x1 / x2)``
            (they differ by rounding inside the clamp and by ``log(1 - eps)`` at it).

    Returns:
        (..., 4) logits.
    """
    if not original:
        return torch.special.logit(x, eps=eps)
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def refine_boxes(delta: Tensor, reference: Tensor, eps: float = BOX_LOGIT_EPS, original: bool = False) -> Tensor:
    """``sigmoid(delta + logit(reference))``: a box-head delta applied to a reference box.

    Args:
        delta: (..., 4) box-head output, in logit space.
        reference: (..., 4) reference boxes in ``[0, 1]``; their logit is ``box_logit(reference, eps, original)``.

    Returns:
        (..., 4) refined boxes in ``[0, 1]``.
    """
    return torch.sigmoid(delta + box_logit(reference, eps, original))


def predict_boxes(
    hidden: Tensor, references: Tensor, box_head: nn.Module, eps: float = BOX_LOGIT_EPS, original: bool = False
) -> Tensor:
    """Every decoder layer's boxes, as the detector outputs them.

    Args:
        hidden: (L, B, Q, D) normalized hidden states of every decoder layer.
        references: (L, B, Q, 4) the reference box each layer refines (``Decoder`` returns them).
        box_head: the box head shared by the layers, (..., D) -> (..., 4), or a ``ModuleList`` of
            one per layer.
        eps, original: the reference boxes' logit (see ``box_logit``).

    Returns:
        (L, B, Q, 4) boxes ``(cx, cy, w, h)`` in ``[0, 1]``.
    """
    if not isinstance(box_head, nn.ModuleList):
        return refine_boxes(box_head(hidden), references, eps, original)
    deltas = torch.stack([head(h) for head, h in zip(box_head, hidden)])  # (L, B, Q, 4)
    return refine_boxes(deltas, references, eps, original)
