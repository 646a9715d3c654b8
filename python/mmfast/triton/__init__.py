"""Triton twins of mmfast's ops, registered as torch.ops.mmfast_triton.* (one module per
op family). Imported by mmfast's backend resolution the first time backend="triton" is used."""
from . import linear_attention  # noqa: F401
