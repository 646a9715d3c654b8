"""Reusable nn.Modules built on mmfast ops, with the parameter names of the models they come
from (so their checkpoints load as is)."""
from .vector_quantizer import VectorQuantizer

__all__ = ["VectorQuantizer"]
