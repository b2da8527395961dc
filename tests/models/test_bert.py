"""gdino.models.grounding_dino.bert against transformers' Grounding DINO text path (phrase masks + BertModel)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import torch

import gdino
from gdino.checkpoint.convert import hf_to_ours
from gdino.models.grounding_dino.bert import BertEncoder, phrase_masks
from gdino.models.grounding_dino.config import SPECIAL_TOKEN_IDS, GroundingDinoConfig

transformers = pytest.importorskip("transformers")
from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd

from reference import noised_reference

VOCAB = Path(gdino.__file__).parent / "data" / "bert-base-uncased-vocab.txt"
CLS, SEP, DOT, QUESTION = SPECIAL_TOKEN_IDS

PROMPTS = [
    "a cat. a remote control.",
    "the astronaut ? a rocket . a flag",  # "?" as a delimiter, no trailing "."
    "coffee mug",  # one phrase, no delimiter at all
]


def hf_masks(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    special = torch.tensor(SPECIAL_TOKEN_IDS)
    return hf_gd.generate_masks_with_special_tokens_and_transfer_map(input_ids, special)


@lru_cache(maxsize=1)
def tokenizer() -> object:
    return transformers.BertTokenizer(str(VOCAB))


def tokenize(prompts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer()(prompts, padding=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------
# phrase_masks


def test_phrase_masks_hand_example() -> None:
    """[CLS] a cat . dog . [SEP]: two phrases, [CLS]/[SEP] alone (values written out by hand)."""
    ids = torch.tensor([[CLS, 5, 6, DOT, 7, DOT, SEP]])
    allowed, pos = phrase_masks(ids, SPECIAL_TOKEN_IDS)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    expected[0, 0] = expected[6, 6] = True
    expected[1:4, 1:4] = True
    expected[4:6, 4:6] = True
    assert torch.equal(allowed[0], expected)
    assert pos.tolist() == [[0, 0, 1, 2, 0, 1, 0]]
    assert allowed.dtype == torch.bool and pos.dtype == torch.long


@pytest.mark.parametrize(
    "ids",
    [
        [[CLS, 5, 6, DOT, 7, DOT, SEP]],
        [[CLS, 5, 6, DOT, 7, SEP]],  # no trailing "."
        [[CLS, 5, QUESTION, 7, 8, DOT, SEP, 0, 0]],  # "?" and padding
        [[CLS, 5, 6, DOT, 7, DOT, SEP, 0], [CLS, 9, 9, 9, 9, DOT, 3, SEP]],  # batch, different lengths
        [[CLS, 5, 6, 7, SEP, 0, 0], [CLS, 5, DOT, DOT, SEP, 0, 0]],  # no delimiter; empty phrase ". ."
        [[5, 6, 7, 8]],  # no special token at all
        [[DOT, DOT, DOT]],
        [[CLS]],
    ],
)
def test_phrase_masks_match_reference(ids: list[list[int]]) -> None:
    input_ids = torch.tensor(ids)
    allowed, pos = phrase_masks(input_ids, SPECIAL_TOKEN_IDS)
    ref_allowed, ref_pos = hf_masks(input_ids)
    assert torch.equal(allowed, ref_allowed)
    assert torch.equal(pos, ref_pos)


def test_phrase_masks_match_reference_random() -> None:
    """Random id sequences dense in delimiters, with random amounts of trailing padding."""
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([CLS, SEP, DOT, QUESTION, 5, 6, 7, 2000, 3000])
    for length in (2, 5, 17, 40):
        ids = pool[torch.randint(len(pool), (6, length), generator=g)]
        pad_from = torch.randint(1, length + 1, (6, 1), generator=g)
        ids = torch.where(torch.arange(length) >= pad_from, 0, ids)
        allowed, pos = phrase_masks(ids, SPECIAL_TOKEN_IDS)
        ref_allowed, ref_pos = hf_masks(ids)
        assert torch.equal(allowed, ref_allowed), ids
        assert torch.equal(pos, ref_pos), ids


def test_phrase_masks_match_reference_tokenized() -> None:
    input_ids = tokenize(PROMPTS)["input_ids"]
    assert (input_ids == 0).any(), "the batch should contain padding"
    allowed, pos = phrase_masks(input_ids, SPECIAL_TOKEN_IDS)
    ref_allowed, ref_pos = hf_masks(input_ids)
    assert torch.equal(allowed, ref_allowed)
    assert torch.equal(pos, ref_pos)


# ---------------------------------------------------------------------------------------------
# BertEncoder


@pytest.fixture(scope="module")
def hf_model() -> torch.nn.Module:
    config = transformers.GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 32,
            "depths": [1, 1, 2, 1],
            "num_heads": [1, 2, 2, 4],
            "out_indices": [2, 3, 4],
            "out_features": ["stage2", "stage3", "stage4"],
            "window_size": 7,
        },
        text_config={
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        encoder_layers=1,
        decoder_layers=2,
        d_model=64,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_queries=50,
    )
    return noised_reference(config, noise=0.05)


@pytest.fixture(scope="module")
def ours(hf_model: torch.nn.Module) -> BertEncoder:
    config = GroundingDinoConfig.from_hf_dict(hf_model.config.to_dict())
    converted, unknown = hf_to_ours(hf_model.state_dict())
    # Only the text backbone matters here (other parts' names are convert.py's business).
    assert [k for k in unknown if k.startswith("model.text_backbone.")] == []
    state = {k.removeprefix("bert."): v for k, v in converted.items() if k.startswith("bert.")}
    model = BertEncoder(config.text).eval()
    model.load_state_dict(state, strict=True)
    return model


def reference_text_features(hf_model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The text backbone called exactly as ``GroundingDinoModel.forward`` calls it."""
    masks, position_ids = hf_gd.generate_masks_with_special_tokens_and_transfer_map(
        input_ids, hf_model.model.special_tokens
    )
    token_type_ids = torch.zeros_like(input_ids)
    out = hf_model.model.text_backbone(input_ids, masks[:, None], token_type_ids, position_ids, return_dict=True)
    return out.last_hidden_state


def test_reference_runs_sdpa(hf_model: torch.nn.Module) -> None:
    """The reference's boolean 4D mask means "may attend" only under SDPA; eager would add it as 0/1."""
    assert hf_model.model.text_backbone.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_bert_matches_reference(hf_model: torch.nn.Module, ours: BertEncoder) -> None:
    input_ids = tokenize(PROMPTS)["input_ids"]
    assert (input_ids == 0).any()
    allowed, position_ids = phrase_masks(input_ids, SPECIAL_TOKEN_IDS)
    got = ours(input_ids, allowed, torch.zeros_like(input_ids), position_ids)
    want = reference_text_features(hf_model, input_ids)
    assert got.shape == (len(PROMPTS), input_ids.shape[1], 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_bert_mask_isolates_phrases(ours: BertEncoder) -> None:
    """A phrase's features do not depend on the other phrases, and padding does not leak in."""
    a = tokenize(["a cat. a dog."])["input_ids"]
    b = tokenize(["a cat. the tall red rocket ship on the pad."])["input_ids"]
    feats = []
    for ids in (a, b):
        allowed, pos = phrase_masks(ids, SPECIAL_TOKEN_IDS)
        feats.append(ours(ids, allowed, torch.zeros_like(ids), pos))
    # [CLS] a cat . are tokens 0..3 in both prompts
    torch.testing.assert_close(feats[0][:, :4], feats[1][:, :4], rtol=0, atol=1e-6)
    assert not torch.allclose(feats[0][:, 4], feats[1][:, 4], atol=1e-3)


@torch.no_grad()
def test_bert_follows_input_dtype(ours: BertEncoder) -> None:
    ids = tokenize(["a cat."])["input_ids"]
    allowed, pos = phrase_masks(ids, SPECIAL_TOKEN_IDS)
    ref = ours(ids, allowed, torch.zeros_like(ids), pos)
    model64 = BertEncoder(ours.config).eval()
    model64.load_state_dict(ours.state_dict())
    out = model64.double()(ids, allowed, torch.zeros_like(ids), pos)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-5)


def test_bert_rejects_non_bool_mask(ours: BertEncoder) -> None:
    ids = tokenize(["a cat."])["input_ids"]
    allowed, pos = phrase_masks(ids, SPECIAL_TOKEN_IDS)
    with pytest.raises(TypeError):
        ours(ids, allowed.float(), torch.zeros_like(ids), pos)
