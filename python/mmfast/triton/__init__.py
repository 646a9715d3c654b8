"""Triton twins of mmfast's compiled kernels (imported lazily: Triton is optional)."""
