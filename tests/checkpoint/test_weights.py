"""Checkpoint layouts, the key mapping both ways, strict loading and the hub path."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gdino.checkpoint import loading as weights
from gdino.checkpoint.convert import hf_to_ours, original_to_ours, ours_to_hf, ours_to_original
from reference import DATA, prefill_hub_cache

OPTIONAL = ("relative_position_index", "position_ids")  # recomputable buffers, present or not in real files


def _original_keys() -> dict[str, tuple[int, ...]]:
    rows = [line.split("\t") for line in (DATA / "groundingdino_swint_ogc.keys.tsv").read_text().splitlines()]
    return {name: tuple(int(x) for x in shape.strip("()").split(",") if x.strip()) for name, shape, _ in rows}


@pytest.mark.slow  # the full-size reference
def test_hf_mapping_round_trips(parity_dir, reference_model):
    from safetensors.torch import load_file

    saved = load_file(parity_dir / "model.safetensors")
    ours, unknown = hf_to_ours(saved)
    assert unknown == []
    back = ours_to_hf(ours)
    for name, t in back.items():
        assert torch.equal(t, saved[name]), name
    # every saved name comes back, but the shared box head's aliases (written once) and the unused Swin norm
    aliases = {k for k in saved if re.match(r"^(model\.decoder\.)?bbox_embed\.", k)} - set(back)
    unused = {k for k in saved if ".swin.layernorm." in k}
    assert set(back) == set(saved) - aliases - unused
    # a live transformers 5 model names Swin differently in memory; it maps to the same tensors
    live, unknown = hf_to_ours(reference_model.state_dict())
    assert unknown == [] and set(live) == set(ours)
    assert all(torch.equal(live[k], ours[k]) for k in ours)


@pytest.mark.slow  # the full-size model
def test_original_layout_matches_the_published_key_list(our_model):
    ours = our_model.state_dict()
    original = ours_to_original(ours, our_model.config.decoder_layers)
    expected = _original_keys()
    required = {k: s for k, s in expected.items() if not k.endswith(OPTIONAL) and not k.startswith("bert.pooler.")}
    assert set(original) == set(required), set(original) ^ set(required)
    for name, t in original.items():
        assert tuple(t.shape) == expected[name], name
    back, unknown = original_to_ours(original)
    assert unknown == [] and set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def _write_original(model, path: Path) -> Path:
    """The model's weights as groundingdino_swint_ogc.pth holds them, unused pooler and buffers included."""
    sd = ours_to_original(model.state_dict(), model.config.decoder_layers)
    expected = _original_keys()
    g = torch.Generator().manual_seed(3)
    for name, shape in expected.items():
        if name.startswith("bert.pooler."):
            sd[name] = torch.randn(shape, generator=g)
        elif name.endswith("relative_position_index"):
            sd[name] = torch.zeros(shape, dtype=torch.long)  # stale values must be ignored, not loaded
    torch.save({"model": sd}, path)
    return path


@pytest.mark.slow  # the full-size model, twice
def test_original_checkpoint_gives_the_same_outputs(our_model, our_processor, tmp_path, data_dir):
    from gdino import AutoModelForZeroShotObjectDetection

    pth = _write_original(our_model, tmp_path / "groundingdino_swint_ogc.pth")
    # transformers' box refinement, to compare with the Hugging Face layout bit for bit
    model = AutoModelForZeroShotObjectDetection.from_pretrained(pth, box_refinement="transformers")
    inputs = our_processor(images=str(data_dir / "coffee.png"), text="a cup. a saucer.", return_tensors="pt")
    with torch.no_grad():
        a, b = our_model(**inputs), model(**inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.pred_boxes, b.pred_boxes)


@pytest.mark.slow  # loads and runs both layouts
def test_box_refinement_follows_the_layout_unless_chosen(small_dir, tmp_path, data_dir):
    """An original .pth refines boxes as the original code (eps 1e-3), the Hugging Face layout as
    transformers (1e-5); ``box_refinement=`` chooses either. The arithmetic itself is checked against
    the original code's in test_decoder.py."""
    from gdino import AutoModelForZeroShotObjectDetection

    hf = AutoModelForZeroShotObjectDetection.from_pretrained(small_dir)
    folder = tmp_path / "original"
    folder.mkdir()
    (folder / "config.json").write_text((small_dir / "config.json").read_text())
    torch.save({"model": ours_to_original(hf.state_dict(), hf.config.decoder_layers)}, folder / "weights.pth")
    original = AutoModelForZeroShotObjectDetection.from_pretrained(folder)
    chosen = AutoModelForZeroShotObjectDetection.from_pretrained(small_dir, box_refinement="original")
    assert (hf.config.box_logit_eps, hf.config.box_logit_original) == (1e-5, False)
    assert (original.config.box_logit_eps, original.config.box_logit_original) == (1e-3, True)
    assert chosen.config == original.config
    with pytest.raises(ValueError, match="box_refinement"):
        AutoModelForZeroShotObjectDetection.from_pretrained(small_dir, box_refinement="1e-3")
    inputs = hf.processor(images=str(data_dir / "coffee.png"), text="a cup. a saucer.")
    with torch.no_grad():
        a, b, c = hf(**inputs), original(**inputs), chosen(**inputs)
    assert torch.equal(a.query_index, b.query_index) and torch.equal(
        a.logits[a.logits.isinf()], b.logits[a.logits.isinf()]
    )
    assert torch.equal(b.pred_boxes, c.pred_boxes) and torch.equal(b.logits, c.logits)
    assert original.transformer.decoder.box_logit == (1e-3, True)  # the decoder's refinement too
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes, atol=1e-4, rtol=0)  # no box of this one is near 0 or 1


def test_strict_loading_names_what_is_wrong(small_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(small_dir / "model.safetensors")
    broken = dict(sd)
    del broken["model.level_embed"]
    broken["model.extra.weight"] = torch.zeros(2)
    broken["model.text_projection.bias"] = torch.zeros(3)
    target = tmp_path / "broken"
    target.mkdir()
    for f in small_dir.iterdir():
        if f.name != "model.safetensors":
            (target / f.name).write_bytes(f.read_bytes())
    save_file(broken, target / "model.safetensors")
    with pytest.raises(weights.CheckpointError) as err:
        weights.load_model(target)
    assert "model.extra.weight" in str(err.value)
    del broken["model.extra.weight"]
    save_file(broken, target / "model.safetensors")
    with pytest.raises(weights.CheckpointError) as err:
        weights.load_model(target)
    message = str(err.value)
    assert "transformer.level_embed" in message and "feat_map.bias" in message and "(3,)" in message


def test_differing_shared_box_head_copies_are_refused(small_dir):
    from safetensors.torch import load_file

    from gdino.checkpoint.convert import ConversionError

    sd = load_file(small_dir / "model.safetensors")
    sd["model.decoder.bbox_embed.1.layers.0.bias"] = sd["bbox_embed.0.layers.0.bias"] + 1
    with pytest.raises(ConversionError, match="bbox_embed"):
        hf_to_ours(sd)


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run(
        [sys.executable, "-m", "gdino", *args], capture_output=True, text=True, env={**full, **env}, timeout=300
    )


@pytest.mark.slow  # the command line in a subprocess
def test_hub_id_loads_from_a_prefilled_cache(small_dir, tmp_path, data_dir):
    cache = tmp_path / "hub"
    prefill_hub_cache(small_dir, cache, "IDEA-Research/grounding-dino-tiny")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = _run_cli(["detect", str(data_dir / "chelsea.png"), "--prompt", "a cat.", "--box-threshold", "0"], env)
    assert result.returncode == 0, result.stderr
    assert '"detections"' in result.stdout


@pytest.mark.slow  # over 1 s on 2 cores (a subprocess or a long computation)
def test_unreachable_hub_gives_a_short_clear_error(tmp_path, data_dir):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2"}
    result = _run_cli(
        ["detect", str(data_dir / "chelsea.png"), "--prompt", "a cat.", "--model", "someone/missing-model"], env
    )
    assert result.returncode == 2
    assert "someone/missing-model" in result.stderr and "local" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_emulated_reduced_precision_on_cpu_warns(tmp_path):
    from gdino.checkpoint.loading import _warn_if_emulated

    plain = tmp_path / "cpuinfo-avx2"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    native = tmp_path / "cpuinfo-bf16"
    native.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16\n")
    with pytest.warns(UserWarning, match="emulated"):
        assert _warn_if_emulated(torch.bfloat16, torch.device("cpu"), str(plain))
    with pytest.warns(UserWarning, match="avx512_fp16"):
        assert _warn_if_emulated(torch.float16, torch.device("cpu"), str(native))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _warn_if_emulated(torch.bfloat16, torch.device("cpu"), str(native))
        assert not _warn_if_emulated(torch.bfloat16, torch.device("cuda"), str(plain))
        assert not _warn_if_emulated(torch.float32, torch.device("cpu"), str(plain))
        assert not _warn_if_emulated(torch.bfloat16, torch.device("cpu"), str(tmp_path / "missing"))
