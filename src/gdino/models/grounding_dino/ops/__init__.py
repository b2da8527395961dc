"""Kernels of the model: multi-scale deformable attention in plain PyTorch (``deformable``) and as
fused Triton kernels for CUDA (``deformable_triton``, optional)."""
