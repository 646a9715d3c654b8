"""mmfast's public ops, one module per op family (API, input checks, fakes, autograd).

Which implementation runs each call is chosen by mmfast.set_backend / use_backend or the
`backend=` argument (see mmfast._backend).

Under torch.autocast the ops with a weight or several float inputs cast them (ops/_autocast.py:
conv / linear / attention to the region's dtype as torch does; group_norm and the VQ search to
fp32, torch's CUDA rule on both devices; decode_attention's queries and kv_cache_append's new
tokens to the static caches' dtype); sample takes any float logits. torch.func's differentiating
transforms and forward-mode AD raise NotImplementedError on the compiled backends (the gradients
are torch.library backward formulas); backend="reference" takes them; vmap and reverse mode work.
"""
from .._backend import get_backend, set_backend, use_backend  # noqa: F401
from .decode import *  # noqa: F401,F403
from .linear_attention import *  # noqa: F401,F403
from .pruned import *  # noqa: F401,F403
from .vq import *  # noqa: F401,F403
