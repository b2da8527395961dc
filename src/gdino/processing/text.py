"""Text side of the processor: BERT tokenisation and phrase spans.

A normalised prompt (``gdino.processing.prompts``: lower case, ending in ``"."``) is tokenised
with the BERT-base-uncased WordPiece vocabulary into ``[CLS] ... [SEP]``; its phrases are the
token runs between ``"."``, ``"?"``, ``[CLS]`` and ``[SEP]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS

if TYPE_CHECKING:  # torch is imported where tensors are made: the ONNX runtime uses this module without it
    import torch

CLS, SEP, PAD, UNK, MASK = "[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"


class PromptError(ValueError):
    """A text prompt is empty, malformed or too long for the model."""


def packaged_vocab_path() -> Path:
    """Path of the BERT-base-uncased ``vocab.txt`` shipped inside the package."""
    return Path(str(resources.files("gdino") / "data" / "bert-base-uncased-vocab.txt"))


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizedText:
    """Padded token ids of a batch of prompts, each ``(B, L)`` int64 with ``L`` the longest."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor


def _bert_tokenizer(
    vocab_file: str | os.PathLike,
    lowercase: bool | None = True,
    strip_accents: bool | None = None,
    tokenize_chinese_chars: bool | None = True,
) -> Tokenizer:
    """Builds the BERT WordPiece tokenizer (``[CLS] text [SEP]``) from a ``vocab.txt``.

    The normaliser options are ``tokenizer_config.json``'s (``read_tokenizer_config``); a None
    ``lowercase`` or ``tokenize_chinese_chars`` means the default, True.
    """
    vocab = models.WordPiece.read_file(str(vocab_file))
    for token in (CLS, SEP, PAD, UNK):
        if token not in vocab:
            raise ValueError(f"vocabulary {vocab_file} has no {token} token; is it a BERT vocab.txt?")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tokenizer.add_special_tokens([t for t in (PAD, UNK, CLS, SEP, MASK) if t in vocab])
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=tokenize_chinese_chars is not False,
        strip_accents=strip_accents,
        lowercase=lowercase is not False,
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


class TextTokenizer:
    """BERT WordPiece tokenizer with Grounding DINO's length limit and batch padding.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` that adds ``[CLS]``/``[SEP]`` itself.
        max_text_len: most tokens (``[CLS]`` and ``[SEP]`` included) the model accepts.
    """

    def __init__(self, tokenizer: Tokenizer, max_text_len: int = 256) -> None:
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_text_len = max_text_len
        pad_id = tokenizer.token_to_id(PAD)
        self.pad_token_id = 0 if pad_id is None else pad_id

    @classmethod
    def from_vocab(
        cls, vocab_file: str | os.PathLike | None = None, max_text_len: int = 256, **normalizer: bool | None
    ) -> TextTokenizer:
        """From a ``vocab.txt`` (the packaged BERT-base-uncased one when ``None``)."""
        path = packaged_vocab_path() if vocab_file is None else Path(vocab_file)
        return cls(_bert_tokenizer(path, **normalizer), max_text_len)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike, max_text_len: int = 256) -> TextTokenizer:
        """From a Hugging Face ``tokenizer.json``."""
        try:
            return cls(Tokenizer.from_file(str(path)), max_text_len)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc

    def offsets(self, prompt: str) -> list[tuple[int, int]]:
        """Character (start, end) of each token of ``encode([prompt])`` in ``prompt``; (0, 0) for [CLS]/[SEP]."""
        return [(start, end) for start, end in self._tok.encode(prompt).offsets]

    def encode(self, prompts: Sequence[str]) -> TokenizedText:
        """Tokenises prompts (already normalised) and pads them to the longest.

        Raises:
            PromptError: if a prompt is longer than ``max_text_len`` tokens.
        """
        import torch

        ids, types, mask = self.encode_arrays(prompts)
        return TokenizedText(torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask))

    def encode_arrays(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``encode`` in numpy: input ids, token type ids and attention mask, each ``(B, L)`` int64.

        Raises:
            PromptError: if a prompt is longer than ``max_text_len`` tokens.
        """
        encodings = self._tok.encode_batch(list(prompts))
        for prompt, enc in zip(prompts, encodings):
            if len(enc.ids) > self.max_text_len:
                raise PromptError(
                    f"the prompt has {len(enc.ids)} tokens ([CLS] and [SEP] included) but the model "
                    f"accepts at most {self.max_text_len}; shorten it (starts {prompt[:60]!r})"
                )
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.pad_token_id, dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[row, :n] = enc.ids
            types[row, :n] = enc.type_ids
            mask[row, :n] = 1
        return ids, types, mask

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text, WordPiece pieces joined (``[SEP]`` etc. kept by default)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """Decodes each id list of ``batch``; see :meth:`decode`."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def read_tokenizer_config(path: Path | None) -> dict[str, bool | None]:
    """The normaliser options (``do_lower_case`` ...) of a ``tokenizer_config.json``, if any."""
    if path is None:
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    options: dict[str, bool | None] = {}
    if "do_lower_case" in cfg:
        options["lowercase"] = bool(cfg["do_lower_case"])
    if "strip_accents" in cfg:
        options["strip_accents"] = cfg["strip_accents"]
    if "tokenize_chinese_chars" in cfg:
        options["tokenize_chinese_chars"] = bool(cfg["tokenize_chinese_chars"])
    return options


# --------------------------------------------------------------------------- phrases


def as_id_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """A 1-D tensor or sequence of token ids -> a list of ints."""
    if not isinstance(token_ids, Sequence):  # a tensor or an array
        if token_ids.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(token_ids.shape)}")
        return list(token_ids.tolist())
    return [int(i) for i in token_ids]


def phrase_spans(
    input_ids: Sequence[int] | torch.Tensor, separator_ids: Sequence[int] = SPECIAL_TOKEN_IDS, pad_token_id: int = 0
) -> list[tuple[int, int]]:
    """Token ranges of the phrases of one tokenised prompt.

    ``[CLS] a cat . a remote control . [SEP]`` -> ``[(1, 3), (4, 7)]``.

    Args:
        input_ids: ``(L,)`` token ids of one prompt (padding allowed).
        separator_ids: ids that end a phrase: ``[CLS]``, ``[SEP]``, ``"."``, ``"?"``.
        pad_token_id: id of padding, also a separator.

    Returns:
        ``(start, end)`` half-open token index ranges, one per non-empty phrase, in order.
    """
    ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    if ids and isinstance(ids[0], list):
        raise ValueError(f"phrase_spans takes the ids of one prompt (L,), got a batch of {len(ids)}")
    stops = {int(s) for s in separator_ids} | {pad_token_id}
    spans, start = [], None
    for i, tok in enumerate(ids):
        if int(tok) in stops:
            if start is not None:
                spans.append((start, i))
            start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(ids)))
    return spans


def phrase_names(
    text: str, tokenizer: TextTokenizer, separator_ids: Sequence[int] = SPECIAL_TOKEN_IDS
) -> tuple[list[tuple[int, int]], list[str]]:
    """Token spans and texts of a normalised prompt's phrases.

    The texts are cut from the prompt by the tokens' character offsets, so a phrase comes back
    as written ("t-shirt"), not as re-joined word pieces ("t - shirt").

    Raises:
        PromptError: a prompt over the token limit, or one with no phrase (e.g. ".").
    """
    ids = tokenizer.encode_arrays([text])[0][0].tolist()  # PromptError if too long
    spans = phrase_spans(ids, separator_ids)
    if not spans:
        raise PromptError(
            f"the prompt {text!r} has no phrase, only separators such as '.'; give e.g. 'a cat. a remote control.'"
        )
    offsets = tokenizer.offsets(text)  # the same tokens as ids
    return spans, [text[offsets[s][0] : offsets[e - 1][1]] for s, e in spans]
