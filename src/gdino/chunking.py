"""Moved to ``gdino.postprocess`` (merging label chunks), ``gdino.detector`` (running them) and
``gdino.boxes`` (``nms``, ``class_nms``); this path stays for code written against it."""

from gdino.boxes import class_nms, nms  # noqa: F401 (re-exported under the old path)
from gdino.detections import *  # noqa: F403 (the moved module's names, under the old path)
from gdino.detector import MANY_CHUNKS, ChunkCallback, on_chunk  # noqa: F401
from gdino.postprocess import *  # noqa: F403 (the moved module's names, under the old path)
