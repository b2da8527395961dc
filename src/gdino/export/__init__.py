"""Exports of the detector to other runtimes (``gdino.export.onnx``)."""
