"""mmfast's public ops, one module per op family (API, input checks, fakes, autograd).

Which implementation runs each call is chosen by mmfast.set_backend / use_backend or the
`backend=` argument (see mmfast._backend).
"""
from .._backend import get_backend, set_backend, use_backend  # noqa: F401
from .decode import *  # noqa: F401,F403
from .linear_attention import *  # noqa: F401,F403
from .pruned import *  # noqa: F401,F403
from .vq import *  # noqa: F401,F403
