"""Random initialisation that loading a checkpoint can skip, chosen by an argument, not a global.

``GroundingDino(config, init_weights=False)`` builds the model for a checkpoint: every tensor is
about to be replaced, and drawing embedding tables from a normal distribution on the meta device
(where models are built for loading) costs about a second on first use. Modules with such tables
take ``init`` and build them with ``embedding``; with ``init=True`` they are drawn exactly as
``nn.Embedding`` draws them, at the same point of construction, so seeded models do not change.
"""

from __future__ import annotations

import torch
from torch import nn


def embedding(num_embeddings: int, dim: int, padding_idx: int | None = None, *, init: bool = True) -> nn.Embedding:
    """``nn.Embedding(num_embeddings, dim, padding_idx)``; its table left uninitialised unless ``init``."""
    if init:
        return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx)
    return nn.Embedding(num_embeddings, dim, padding_idx=padding_idx, _weight=torch.empty(num_embeddings, dim))
