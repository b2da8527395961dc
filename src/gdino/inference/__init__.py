"""Running a model on user input: ``detector`` (the one-call API), ``postprocess`` (the one decode of
raw outputs into ``Detections``, in numpy, shared with the torch-free runtime) and ``detections``.

This ``__init__`` imports nothing, so the torch-free modules here load without torch."""
