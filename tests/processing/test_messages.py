"""Messages that say what is wrong: a folder given as an image, a number in a label list, an image
over PIL's decompression-bomb size (one log line, not PIL's raw warning)."""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from gdino import ImageError, PromptError
from gdino.processing.image import load_image
from gdino.processing.prompts import read_prompts


def test_a_folder_is_not_an_image(tmp_path) -> None:
    with pytest.raises(ImageError, match=r"is a folder, not an image file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match=r"image file not found"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize(("labels", "index", "shown"), [(["cat", 5], 1, "5 (int)"), ([None, "dog"], 0, "None")])
def test_a_label_that_is_not_a_string_is_named(labels, index, shown) -> None:
    with pytest.raises(PromptError, match=re.escape(f"labels must be strings; label {index} is {shown}")):
        read_prompts(labels, 1)


def test_a_mix_of_lists_and_strings_is_still_explained() -> None:
    with pytest.raises(PromptError, match="mixes strings and lists"):
        read_prompts(["cat", ["dog"]], 2)


def test_a_large_image_is_one_log_line_not_pils_warning(tmp_path, caplog, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 pixels is "large" now, under 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's own DecompressionBombWarning would fail here
        with caplog.at_level(logging.WARNING, logger="gdino.processing.image"):
            image = load_image(path)
    assert image.size == (400, 300)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"{path} is 400x300 (0 megapixels): decoding it takes about 0 MB"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # over twice the limit: PIL refuses to decode
    with pytest.raises(ImageError, match="too large to decode safely"):
        load_image(path)
