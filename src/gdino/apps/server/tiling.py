"""Tiled detection on the server: the request fields and the limit on its passes.

A request asks for tiles with ``tile`` (the tile side in pixels) and, optionally, ``tile_overlap``
(default 0.2), ``tile_merge`` ("greedynmm" or "nms") and ``full_image`` (default true). A tiled
request runs (tiles + the whole image) x (label chunks) passes of the encoder and decoder, and the
server's ``max_chunks`` bounds that product as it bounds a label list's chunks: 413
``too_many_tiles`` past it. A tile the image cannot hold, or settings out of range, are 422.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from gdino.apps.server.settings import ApiError
from gdino.inference.tiled import tile_count
from gdino.inference.tiles import TileSettings

TILE_FIELDS = ("tile", "tile_overlap", "tile_merge", "full_image")
TILE_BATCH = 4  # tiles through the model at once: the worker's memory per request stays bounded


def read_tiles(field: Callable[[str], Any]) -> TileSettings | None:
    """The ``TileSettings`` of a request whose field ``name`` is ``field(name)`` (None if absent).

    Raises:
        ApiError: 422 for a value of the wrong type or out of range, or tile options without ``tile``.
    """
    size, overlap, merge, full = (field(name) for name in TILE_FIELDS)
    if size is None or size == "":
        given = [name for name, value in zip(TILE_FIELDS[1:], (overlap, merge, full)) if value not in (None, "")]
        if given:
            raise ApiError(422, "invalid_tiles", f"{given[0]} sets how tiles are detected: give it with tile")
        return None
    try:
        return TileSettings(
            _whole(size),
            0.2 if overlap in (None, "") else _number(overlap, "tile_overlap"),
            _full_image(full),
            merge or "greedynmm",
        )
    except ValueError as exc:
        raise ApiError(422, "invalid_tiles", f"tile settings: {exc}"[:300]) from None


def _whole(value: Any) -> Any:
    """A form's "640" as 640; anything else as given (``TileSettings`` refuses what is not whole)."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ApiError(
                422, "invalid_tiles", f"tile must be a whole number of pixels, got {value!r}"[:200]
            ) from None
    return value


def _number(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ApiError(422, "invalid_tiles", f"{name} must be a number, got {value!r}"[:200]) from None
    return value


def _full_image(value: Any) -> bool:
    if value is None or value == "" or value is True:
        return True
    if value is False:
        return False
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ApiError(422, "invalid_tiles", f"full_image must be true or false, got {value!r}"[:200])


def check_tile_cost(image: Image.Image, tiles: TileSettings | None, chunks: int, max_chunks: int) -> None:
    """Refuses a tiled request whose passes ((tiles + whole image) x ``chunks``) exceed ``max_chunks``.

    Raises:
        ApiError: 422 for a tile larger than the image, 413 ``too_many_tiles`` past the limit.
    """
    if tiles is None:
        return
    try:
        passes = tile_count([image.size], tiles)
    except ValueError as exc:
        raise ApiError(422, "invalid_tiles", str(exc)) from None
    if passes * chunks > max_chunks:
        raise ApiError(
            413,
            "too_many_tiles",
            f"{passes} tiles (with the whole image) x {chunks} label chunk(s) need {passes * chunks} passes of the "
            f"encoder and decoder; the server runs at most {max_chunks} per request (--max-chunks): "
            "give a larger tile, less overlap, or full_image=false",
        )
