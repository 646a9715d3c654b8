"""Pure-PyTorch references shared by the tests and the benchmarks, one file per op family.

Every op in mmfast has exactly one reference here. References compute in fp32 (fp64 for
fp64 inputs), whatever the input dtype, and return the dtype the op returns. They are
written for clarity, not speed.
"""
from .linear_attention import *  # noqa: F401,F403
