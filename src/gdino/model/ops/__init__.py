"""Kernels of the model: multi-scale deformable attention in PyTorch and in Triton."""
