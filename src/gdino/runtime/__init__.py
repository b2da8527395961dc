"""Runtimes for exported graphs, torch-free: ``onnx`` (onnxruntime or OpenVINO)."""
