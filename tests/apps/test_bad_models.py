"""A model folder or an export that cannot be used is one line naming the file and the field,
exit status 2, never a traceback: config.json values, broken JSON, corrupt graphs, a broken
gdino_onnx.json, a runtime that is not installed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from gdino import CheckpointError, GroundingDinoForObjectDetection


def run_main(capsys, *args: str | Path) -> tuple[int, str]:
    from gdino.apps.cli import main

    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def _one_line(status: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("gdino: error:"), err
    assert "Traceback" not in err
    assert all(n in lines[0] for n in needles), err


def _copy(small_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(small_dir, folder)
    return folder


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("num_queries", -5, "num_queries must be a whole number >= 1, got -5"),
        ("decoder_layers", "three", "decoder_layers must be a whole number >= 1, got 'three'"),
        ("encoder_attention_heads", 7, "encoder_attention_heads = 7 heads"),
        ("max_text_len", 100000, "max_text_len = 100000 is more tokens than the text encoder has positions for"),
        ("layer_norm_eps", "tiny", "layer_norm_eps must be a positive number"),
        ("backbone_config", [1], "backbone_config must be an object"),
        ("focal_alpha", None, "focal_alpha must be a number >= 0"),
    ],
)
def test_a_bad_config_value_is_one_line(small_dir, data_dir, tmp_path, capsys, key, value, needle) -> None:
    folder = _copy(small_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    status, err = run_main(capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", folder)
    _one_line(status, err, str(folder / "config.json"), needle)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        GroundingDinoForObjectDetection.from_pretrained(folder)


def test_a_nested_config_value_names_its_section(small_dir, tmp_path) -> None:
    folder = _copy(small_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"text_config.hidden_size = 64 cannot be split into text_config"):
        GroundingDinoForObjectDetection.from_pretrained(folder)


def test_broken_config_json_is_one_line(small_dir, data_dir, tmp_path, capsys) -> None:
    folder = _copy(small_dir, tmp_path)
    (folder / "config.json").write_text('{"d_model": 64,')
    status, err = run_main(capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", folder)
    _one_line(status, err, str(folder / "config.json"), "not valid JSON")


@pytest.fixture
def fake_export(small_dir, tmp_path) -> Path:
    """An export folder whose settings and tokenizer are right and whose graphs are not ONNX."""
    folder = tmp_path / "export"
    folder.mkdir()
    GroundingDinoForObjectDetection.from_pretrained(small_dir).processor.tokenizer._tok.save(str(folder / "t.json"))
    graphs = {}
    for name in ("text", "image", "detection"):
        (folder / f"{name}.onnx").write_bytes(b"\x08\x07truncated")
        graphs[name] = f"{name}.onnx"
    settings = {
        "graphs": graphs,
        "max_text_len": 256,
        "special_token_ids": [101, 102, 1012, 1029],
        "tokenizer": "t.json",
        "image": {"shortest_edge": 160, "longest_edge": 256},
    }
    (folder / "gdino_onnx.json").write_text(json.dumps(settings))
    return folder


def test_a_corrupt_graph_is_one_line(fake_export, data_dir, capsys) -> None:
    pytest.importorskip("onnxruntime")
    status, err = run_main(capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", fake_export)
    _one_line(status, err, str(fake_export / "text.onnx"), "cannot be loaded by onnxruntime")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda s: "{not json", "cannot read"),
        (lambda s: json.dumps({k: v for k, v in s.items() if k != "tokenizer"}), "has no 'tokenizer'"),
        (lambda s: json.dumps({**s, "max_text_len": "256"}), "'max_text_len' must be a whole number, got '256'"),
        (lambda s: json.dumps({**s, "graphs": {"text": "text.onnx"}}), "no file for the image, detection graph"),
        (lambda s: json.dumps({**s, "image": {"shortest_edge": 160, "colour": "red"}}), "'image' holds settings"),
    ],
)
def test_a_broken_settings_file_is_one_line(fake_export, data_dir, capsys, change, needle) -> None:
    path = fake_export / "gdino_onnx.json"
    path.write_text(change(json.loads(path.read_text())))
    status, err = run_main(capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", fake_export)
    _one_line(
        status, err, str(fake_export / "gdino_onnx.json") if "tokenizer" not in needle else "gdino_onnx.json", needle
    )


def test_openvino_not_installed_says_which_extra(fake_export, data_dir, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    status, err = run_main(
        capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", fake_export, "--runtime", "openvino"
    )
    _one_line(status, err, "needs openvino", "pip install 'gdino[openvino]'")


def test_graphs_without_their_settings_file(fake_export, data_dir, capsys) -> None:
    (fake_export / "gdino_onnx.json").unlink()
    status, err = run_main(capsys, "detect", data_dir / "chelsea.png", "--prompt", "cat", "--model", fake_export)
    _one_line(status, err, "holds ONNX graphs but no gdino_onnx.json")
