"""BERT text encoder (BERT-base without its pooler) and Grounding DINO's phrase masks.

Grounding DINO feeds the prompt ("cat . remote control .") to BERT with a block-diagonal
self-attention mask, so that each phrase is encoded on its own, and with position ids that restart
at 0 in each phrase. ``phrase_masks`` builds both from the token ids; ``BertEncoder`` runs BERT with
them.

Parameter names follow the Hugging Face / original ``bert.`` layout (``embeddings.LayerNorm``,
``encoder.layer.{i}.attention.self.query``, ...), so a checkpoint's tensors load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gdino.models.grounding_dino.attention import attend
from gdino.models.grounding_dino.config import BertConfig
from gdino.models.grounding_dino.init import embedding


def phrase_masks(input_ids: Tensor, special_token_ids: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Self-attention mask and position ids that keep the prompt's phrases apart.

    A phrase is the run of tokens up to and including the next special token (its closing
    delimiter: "." or "?", or [SEP] when the prompt has no trailing "."). Tokens attend to the
    tokens of their own phrase only and count positions from 0 at the phrase's first token. A
    token whose closing delimiter is the first token, the last token, or missing (padding after
    [SEP]) forms no phrase: it attends to itself only and has position 0. This is exactly what the
    reference (``generate_masks_with_special_tokens_and_transfer_map``) computes.

    Args:
        input_ids: (B, T) token ids.
        special_token_ids: ids of the delimiters ([CLS], [SEP], ".", "?").

    Returns:
        allowed: (B, T, T) bool, True where query token i may attend key token j.
        position_ids: (B, T) long.
    """
    t = input_ids.shape[1]
    # A comparison with each delimiter, not torch.isin: that exports to ONNX (isin becomes searchsorted).
    special = (input_ids[..., None] == torch.tensor(special_token_ids, device=input_ids.device)).any(-1)  # (B, T)
    idx = torch.arange(t, device=input_ids.device)  # (T,)
    # As (T, T) comparisons rather than cumulative min/max, which ONNX lacks (T <= 256).
    delimiters = torch.where(special[:, None, :], idx, t)  # (B, 1, T): each delimiter's index, t elsewhere
    # First delimiter at or after each token (t if none): tokens sharing it form one phrase.
    closing = torch.where(idx[None, :] >= idx[:, None], delimiters, t).amin(-1)  # (B, T)
    # Last delimiter strictly before each token (-1 if none): the phrase starts right after it.
    opening = torch.where((idx[None, :] < idx[:, None]) & special[:, None, :], idx, -1).amax(-1)  # (B, T)
    in_phrase = (closing > 0) & (closing < t - 1)  # (B, T)
    same = closing[:, :, None] == closing[:, None, :]  # (B, T, T)
    eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
    allowed = (same & in_phrase[:, None, :]) | eye  # (B, T, T)
    position_ids = torch.where(in_phrase, idx - opening - 1, 0)  # (B, T)
    return allowed, position_ids.long()


class BertEmbeddings(nn.Module):
    """Sum of word, position and token-type embeddings, then LayerNorm.

    ``init=False`` leaves the tables uninitialised, for a checkpoint to fill (``gdino.models.grounding_dino.init``).
    """

    def __init__(self, config: BertConfig, init: bool = True) -> None:
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = embedding(config.vocab_size, h, padding_idx=config.pad_token_id, init=init)
        self.position_embeddings = embedding(config.max_position_embeddings, h, init=init)
        self.token_type_embeddings = embedding(config.type_vocab_size, h, init=init)
        self.LayerNorm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, hidden)."""
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(position_ids))


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with separate query/key/value projections."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        if h % config.num_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_heads {config.num_heads}")
        self.num_heads = config.num_heads
        self.head_dim = h // config.num_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """Attends ``x`` (B, T, hidden) to itself where ``allowed`` (B, 1, T, T) is True.

        Returns:
            (B, T, hidden), heads concatenated, before the output projection.
        """
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        out = attend(q, k, v, allowed, self.head_dim**-0.5)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, -1)  # (B, T, nh*hs)


class DenseAddNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's output of the attention and of the MLP."""

    def __init__(self, in_dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """(B, T, in_dim), (B, T, out_dim) -> (B, T, out_dim)."""
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    """Self-attention followed by its output projection, residual and LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = DenseAddNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """(B, T, hidden), mask (B, 1, T, T) -> (B, T, hidden)."""
        return self.output(self.self(x, allowed), x)


class BertIntermediate(nn.Module):
    """The MLP's expansion: ``gelu(dense(x))`` with the exact (erf) GELU."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, hidden) -> (B, T, intermediate)."""
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """One post-norm transformer layer: attention, then MLP, each with residual and LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = DenseAddNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """(B, T, hidden), mask (B, 1, T, T) -> (B, T, hidden)."""
        x = self.attention(x, allowed)
        return self.output(self.intermediate(x), x)


class BertLayerStack(nn.Module):
    """The ``encoder.layer.{i}`` stack."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """(B, T, hidden), mask (B, 1, T, T) -> (B, T, hidden)."""
        for layer in self.layer:
            x = layer(x, allowed)
        return x


class BertEncoder(nn.Module):
    """BERT without its pooler: token ids -> contextual token features (``init``: see ``BertEmbeddings``)."""

    def __init__(self, config: BertConfig, init: bool = True) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config, init)
        self.encoder = BertLayerStack(config)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, position_ids: Tensor
    ) -> Tensor:
        """Encodes a batch of prompts.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T, T) bool, True where query token i may attend key token j
                (``phrase_masks``'s first output). Every row must allow at least one key.
            token_type_ids: (B, T) segment ids (zeros for a single prompt).
            position_ids: (B, T) position ids (``phrase_masks``'s second output).

        Returns:
            (B, T, hidden) last hidden state.
        """
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"attention_mask must be bool (True = may attend), got {attention_mask.dtype}")
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(x, attention_mask[:, None])  # mask (B, 1, T, T): same for every head
