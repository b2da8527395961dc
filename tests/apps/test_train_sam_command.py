"""``gdino train-sam``: a folder that already holds a model, or a file, is refused with status 2."""

from __future__ import annotations

from gdino.apps.cli import main


def test_train_sam_refuses_to_replace_a_model_or_write_into_a_file(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"mine")
    assert main(["train-sam", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "already holds a model; give --overwrite" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == b"mine"
    file = tmp_path / "a.txt"
    file.write_text("x")
    assert main(["train-sam", "--out", str(file)]) == 2
    assert "is a file" in capsys.readouterr().err
