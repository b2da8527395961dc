"""Random initialisation, kept apart from building a module so that loading a checkpoint skips it.

Embedding tables are created uninitialised (``embedding``): drawing them from a normal
distribution on the meta device, where models are built for loading, costs about a second on
first use. ``init_weights`` draws them (and any other parameter whose module asks, through a
``reset_parameters_extra`` method), as a fresh model's constructor does.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An ``nn.Embedding`` whose table is left uninitialised (see ``init_weights``)."""
    return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx, _weight=torch.empty(num_embeddings, dim))


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Draws what ``embedding`` and ``reset_parameters_extra`` methods left for later.

    Embedding tables get N(0, 1) with a zero padding row, as ``nn.Embedding`` draws them.
    """
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].fill_(0)
        extra = getattr(module, "reset_parameters_extra", None)
        if extra is not None:
            extra()
