"""Small pieces every SAM part uses: a channels-first layer norm and two MLPs."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Channels-first norms (neck, mask input, output upscaling, SAM-HQ's fusion) use 1e-6 in the
# original and in transformers alike.
NORM2D_EPS = 1e-6


class LayerNorm2d(nn.Module):
    """Layer norm over the channels of a (B, C, H, W) map.

    Computed as the original does (mean and variance over dim 1, then the affine); transformers
    permutes to channels-last and calls ``F.layer_norm``, which agrees to float rounding.
    """

    def __init__(self, channels: int, eps: float = NORM2D_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)  # (B, 1, H, W)
        var = (x - mean).pow(2).mean(1, keepdim=True)  # (B, 1, H, W)
        x = (x - mean) / (var + self.eps).sqrt()
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: the ViT blocks' MLP (GELU) and the two-way transformer's (ReLU)."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)
        self.act = act()

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them: the hypernetwork and IoU heads.

    The layers are ``layers.0`` ... ``layers.{num_layers - 1}`` as in the original (transformers
    calls the first and last ``proj_in`` and ``proj_out``).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return x
