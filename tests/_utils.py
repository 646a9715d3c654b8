"""Helpers shared by the test files: devices, backends, per-dtype tolerances, tiny UNet inputs,
pruned-expert routing.

The test files import from here (`from _utils import ...`); fixtures live in conftest.py.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import mmfast
from mmfast import reference

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
# Without a GPU the Triton kernels run under the interpreter, on CPU tensors.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

# (atol, rtol) against the fp32/fp64 reference computed from the same inputs: about two units in
# the last place for fp16 and bf16; for fp32 about 170 (the CPU kernels measure under 1e-6 of the
# output's largest entry; the fp32 paths of the GPU kernels, tf32 splits among them, are not
# measured tighter yet), for fp64 a bound on summation order only.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def fuzz_settings():
    """The hypothesis settings of every tests/test_fuzz_*.py: MMFAST_FUZZ_EXAMPLES examples per
    property (40 in CI); CI replays the same examples every run, MMFAST_FUZZ_RANDOM=1 draws new
    ones (with pytest --hypothesis-seed=N to repeat a run)."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=int(os.environ.get("MMFAST_FUZZ_EXAMPLES", "40")),
                    derandomize=os.environ.get("MMFAST_FUZZ_RANDOM") != "1", deadline=None, database=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def backend_params():
    """(backend, device) pairs of the native and Triton backends, CUDA ones marked `cuda`."""
    params = [pytest.param(("native", "cpu"), id="native-cpu")]
    params.append(pytest.param(("native", "cuda"), id="native-cuda", marks=pytest.mark.cuda))
    if HAS_TRITON:
        params.append(pytest.param(("triton", TRITON_DEVICE), id=f"triton-{TRITON_DEVICE}"))
    return params


def subnormal_step(dtype) -> float:
    """The spacing of dtype's subnormal numbers: no result rounded to dtype is closer than half of it
    (fp16: 6e-8, where the tolerance scaled by a tiny result's size would ask for less)."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def assert_close(actual, expected, dtype, scale=1.0):
    """actual == expected within `scale` times the tolerance of `dtype` (at least two of its
    subnormal steps), compared in fp64."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale + 2 * subnormal_step(dtype),
                               rtol=rtol * scale)


# A gradient under this fraction of the call's largest one is taken as cancelling to ~0 (dq and
# dk of a single token, or of identical tokens): it keeps rounding noise of its terms, whose size
# is the call's other gradients' (Triton fp16 with TF32 dots: up to 5e-3 of them at Dv >= 128).
CANCELLING = 1e-2


def gradient_scale(own: float, largest: float) -> float:
    """The magnitude a gradient's rounding is relative to: its own largest entry, or the call's
    largest gradient's where it cancels (own < CANCELLING x largest)."""
    return own if own >= CANCELLING * largest else largest


def assert_grads_close(grads, expected, dtype, factor=1.0):
    """Each gradient == its expected one within `factor` times the tolerance of `dtype`, the
    absolute part scaled by gradient_scale (sums over a sequence round relative to their largest
    terms). Before, each was scaled by max(1, its own largest): a bf16 dq of size 0.01-0.04
    passed as all zeros."""
    assert len(grads) == len(expected), (len(grads), len(expected))
    own = [e.detach().double().abs().max().item() if e.numel() else 0.0 for e in expected]
    largest = max(own, default=0.0)
    atol, rtol = TOLERANCES[dtype]
    for index, (got, want, size) in enumerate(zip(grads, expected, own)):
        assert got.shape == want.shape, index
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol * factor,
                                   atol=atol * factor * gradient_scale(size, largest) + 2 * subnormal_step(dtype))


# --- linear attention -------------------------------------------------------------------


def make_qkv(shape, dtype, device, requires_grad=False):
    b, n, h, dk, dv = shape
    q = torch.randn(b, n, h, dk, dtype=dtype, device=device)
    k = torch.randn(b, n, h, dk, dtype=dtype, device=device)
    v = torch.randn(b, n, h, dv, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def reference_grads(q, k, v, grad_out, eps=1e-4, feature_map="elu1"):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = reference.linear_attention_ref(*leaves, eps, feature_map)
    return torch.autograd.grad(out, leaves, grad_out.double())


# --- LinFusion on tiny diffusers UNets -------------------------------------------------

# The backends the LinFusion tests run on the CPU: the native one when it is built.
LINFUSION_BACKENDS = ["reference"] + (
    ["native"] if mmfast._backend.native_available("linear_attention", torch.device("cpu")) else [])



def unet_inputs(unet, batch=2, tokens=7, seed=1):
    """(latents, timesteps, text embeddings) for a tiny UNet2DConditionModel."""
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([10, 500])[:batch], context


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def make_routing(batch, codes, in_channels, out_channels, device, groups=None, generator=None):
    """Random codes (every code used when batch allows) and masks keeping about 60%; with
    `groups` the out mask keeps whole groups of out_channels / groups channels, like APTP."""
    g = generator or torch.Generator().manual_seed(1)
    sample_codes = torch.randint(0, codes, (batch,), generator=g)
    sample_codes[:min(batch, codes)] = torch.randperm(codes, generator=g)[:min(batch, codes)]
    in_mask = torch.rand(codes, in_channels, generator=g) < 0.6
    if groups:
        out_mask = (torch.rand(codes, groups, generator=g) < 0.6).repeat_interleave(out_channels // groups, 1)
    else:
        out_mask = torch.rand(codes, out_channels, generator=g) < 0.6
    return sample_codes.to(device), in_mask.to(device), out_mask.to(device)


def rendezvous(tmp_path):
    """init_method for torch.distributed test workers: a file store unique to the test (a free
    TCP port could be taken by a test in another pytest-xdist worker before the workers bind it)."""
    return f"file://{tmp_path}/rendezvous"


def at_thread_counts(run, counts=(1, 2, 3)):
    """[run() at torch.set_num_threads(c) for c in counts]; the thread count is restored after."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    return results
