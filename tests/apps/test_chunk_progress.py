"""A long label list states its cost: ``detect`` warns how many passes it runs, the CLI shows them."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from gdino.apps.cli import main as cli
from gdino.inference.detector import MANY_CHUNKS, _warn_cost, on_chunk
from gdino.utils.progress import ChunkProgress

LABELS = [chr(0x4E00 + i) for i in range(1100)]  # one token each: 127 a chunk, 9 chunks


@pytest.mark.slow  # a label list of many passes
def test_detect_warns_of_the_passes_a_long_list_needs(fast_model, caplog):
    _warn_cost.cache_clear()  # it says so once per process
    image = Image.new("RGB", (1, 1))
    calls: list[tuple[int, int]] = []
    with caplog.at_level(logging.WARNING, logger="gdino"), on_chunk(lambda done, total: calls.append((done, total))):
        fast_model.detect(image, LABELS)
        fast_model.detect(image, LABELS)
    chunks = calls[-1][1]
    assert chunks >= MANY_CHUNKS
    assert calls == [(i, chunks) for i in range(chunks + 1)] * 2  # before each pass and after the last
    warnings = [r.getMessage() for r in caplog.records if "passes" in r.getMessage()]
    assert warnings == [
        f"1100 labels need {chunks} passes of the encoder and decoder per image (each up to 256 "
        "tokens); a shorter list is faster"
    ]  # once, not per image
    calls.clear()
    with on_chunk(lambda done, total: calls.append((done, total))):
        fast_model.detect(image, ["cat", "dog"])
    assert calls == [(0, 1), (1, 1)]


def test_a_callback_can_stop_between_passes(fast_model):
    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), on_chunk(stop):
        fast_model.detect(Image.new("RGB", (8, 8)), LABELS)


def test_chunk_progress_lines():
    stream = io.StringIO()
    progress = ChunkProgress(stream=stream, every=0.0)
    for done in range(4):
        progress(done, 3)
    progress(0, 1)  # a one-chunk list is quiet
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("detect: label chunks 0/3 passes") and lines[-1].startswith(
        "detect: label chunks 3/3 passes"
    )


@pytest.mark.slow  # the command line in a subprocess
def test_cli_shows_the_passes_on_stderr(fast_dir, data_dir, capsys):
    assert cli(["detect", str(data_dir / "coffee.png"), "--prompt", ",".join(LABELS), "--model", str(fast_dir)]) == 0
    captured = capsys.readouterr()
    assert '"detections"' in captured.out
    assert "passes" in captured.err and "9/9 passes" in captured.err, captured.err
