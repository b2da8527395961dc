"""The bottom layer: box formats, setting checks, progress reporting, atomic files and model-name resolution.

Nothing here imports another gdino module except within ``gdino.utils``."""
