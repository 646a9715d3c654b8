"""Pure-PyTorch references shared by the tests and the benchmarks, one file per op family.

Every op in mmfast has exactly one reference here. References compute in at least fp32
(each family's file says which precision, and why), whatever the input dtype, and return the
dtypes the op returns. They are written for clarity and accuracy, not speed.
"""
from .decode import *  # noqa: F401,F403
from .linear_attention import *  # noqa: F401,F403
from .pruned import *  # noqa: F401,F403
from .vq import *  # noqa: F401,F403
