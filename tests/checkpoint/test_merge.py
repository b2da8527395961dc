"""``gdino merge`` (WiSE-FT, ``gdino.checkpoint.merge``): alpha 0 and 1 give the inputs exactly,
0.5 their mean; the result loads in gdino (and detects) and in transformers; each bad input is
one line, status 2, with nothing written.

TUNED is the packaged ``gdino-shapes`` with every weight moved a little (no training needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gdino.apps.cli import main
from gdino.checkpoint.loading import read_state_dict
from gdino.checkpoint.merge import MergeError, interpolate
from gdino.checkpoint.saving import save_pretrained
from gdino.inference.detector import GroundingDinoForObjectDetection
from gdino.models.grounding_dino.config import GroundingDinoConfig
from gdino.utils.hub import resolve


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """gdino-shapes with noise (std 0.01) on every weight, saved as a training run would save it."""
    model = GroundingDinoForObjectDetection.from_pretrained("gdino-shapes")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return save_pretrained(model, tmp_path_factory.mktemp("tuned") / "epoch-1", model.processor)


def _ours(spec: str | Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in read_state_dict(resolve(spec)).items()}


def _merge(base: str | Path, tuned: str | Path, alpha: str, out: Path, capsys) -> tuple[int, str]:
    status = main(["merge", str(base), str(tuned), "--alpha", alpha, "--out", str(out)])
    return status, capsys.readouterr().err


def test_alpha_0_and_1_give_the_inputs_and_a_half_their_mean(tuned, tmp_path, capsys):
    base, fine = _ours("gdino-shapes"), _ours(tuned)
    assert any(not torch.equal(base[k], fine[k]) for k in base)
    for alpha, expected in (("0", base), ("1", fine)):
        status, err = _merge("gdino-shapes", tuned, alpha, tmp_path / alpha, capsys)
        assert status == 0, err
        merged = _ours(tmp_path / alpha)
        assert merged.keys() == expected.keys()
        assert all(torch.equal(merged[k], expected[k]) for k in expected), alpha
    assert _merge("gdino-shapes", tuned, "0.5", tmp_path / "half", capsys)[0] == 0
    half = _ours(tmp_path / "half")
    assert all(torch.allclose(half[k], (base[k] + fine[k]) / 2, atol=1e-7) for k in base)
    written = sorted(p.name for p in (tmp_path / "half").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "preprocessor_config.json"} <= set(
        written
    )
    assert (tmp_path / "half" / "tokenizer.json").read_bytes() == (tuned / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "half" / "merge.json").read_text())["alpha"] == 0.5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.slow  # two detect runs and transformers' import
def test_the_merged_checkpoint_detects_and_loads_in_transformers(tuned, tmp_path, capsys):
    """Alpha 0 detects what gdino-shapes detects; transformers loads the result with every tensor used."""
    transformers = pytest.importorskip("transformers")
    from gdino.training.shapes import ShapesSettings, write_shapes_dataset

    files = write_shapes_dataset(tmp_path / "data", {"val": 1}, seed=5, settings=ShapesSettings(image_size=(160, 160)))
    image = next((files["val"].parent / "val").iterdir())
    assert _merge("gdino-shapes", tuned, "0", tmp_path / "m", capsys)[0] == 0
    labels = ",".join(json.loads(files["val"].read_text())["categories"][i]["name"] for i in range(21))
    found = []
    for model in ("gdino-shapes", tmp_path / "m"):
        assert main(["detect", str(image), "--prompt", labels, "--model", str(model)]) == 0
        found.append(json.loads(capsys.readouterr().out)["detections"])
    assert found[0] and found[0] == found[1]
    theirs, info = transformers.GroundingDinoForObjectDetection.from_pretrained(
        tmp_path / "m", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = GroundingDinoForObjectDetection.from_pretrained(tmp_path / "m")
    name = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(theirs.state_dict()[name], load_file(str(tmp_path / "m" / "model.safetensors"))[name])
    assert ours.config.d_model == theirs.config.d_model == 64


def test_interpolate_refuses_other_tensors():
    a = {"x": torch.zeros(2), "y": torch.ones(3)}
    assert torch.equal(interpolate(a, {"x": torch.ones(2), "y": torch.ones(3)}, 0.25)["x"], torch.full((2,), 0.25))
    with pytest.raises(MergeError, match="only in BASE 1: y"):
        interpolate(a, {"x": torch.ones(2)}, 0.5)
    with pytest.raises(MergeError, match=r"shapes differ 1: y \(3,\) -> \(4,\)"):
        interpolate(a, {"x": torch.ones(2), "y": torch.ones(4)}, 0.5)
    with pytest.raises(MergeError, match="between 0 and 1"):
        interpolate(a, a, 1.5)


def test_bad_input_is_one_line_and_nothing_is_written(tuned, tmp_path, capsys):
    out = tmp_path / "out"
    for alpha in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit) as e:
            main(["merge", "gdino-shapes", str(tuned), "--alpha", alpha, "--out", str(out)])
        assert e.value.code == 2 and "argument --alpha" in capsys.readouterr().err

    other = save_pretrained(GroundingDinoForObjectDetection(GroundingDinoConfig.small_test()), tmp_path / "small")
    status, err = _merge("gdino-shapes", other, "0.5", out, capsys)
    assert (
        status == 2
        and "different architectures: num_queries: 100 -> 50; encoder_layers" in err
        and len(err.splitlines()) == 1
    )

    words = tmp_path / "words"
    shutil.copytree(tuned, words)
    (words / "tokenizer.json").unlink()
    vocab = (words / "vocab.txt").read_text().splitlines()
    (words / "vocab.txt").write_text("\n".join([vocab[1], vocab[0], *vocab[2:]]) + "\n")
    status, err = _merge("gdino-shapes", words, "0.5", out, capsys)
    assert status == 2 and "different vocabularies" in err and "'[unused0]'" in err

    cut = tmp_path / "cut"
    shutil.copytree(tuned, cut)
    tensors = load_file(str(cut / "model.safetensors"))
    del tensors["model.decoder.layers.0.fc1.weight"]
    save_file(tensors, str(cut / "model.safetensors"))
    status, err = _merge("gdino-shapes", cut, "0.5", out, capsys)
    assert status == 2 and "only in BASE 1: transformer.decoder.layers.0.linear1.weight" in err

    status, err = _merge("gdino-shapes", tuned, "0.5", tuned, capsys)
    assert status == 2 and "is one of the inputs" in err
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    status, err = _merge("gdino-shapes", tuned, "0.5", out, capsys)
    assert status == 2 and "is not empty" in err and (out / "mine.txt").read_text() == "keep me"
    status, err = _merge("no-such-model-here", tuned, "0.5", tmp_path / "new", capsys)
    assert status == 2 and "no such file or directory: no-such-model-here" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "out", "small", "words"]
