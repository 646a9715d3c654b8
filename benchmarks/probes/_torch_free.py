"""The probes' shared step: the torch-free decode kernels plus a probe's extern "C" shim, built
with g++ for the ISA this CPU runs and loaded with ctypes, so that kernel variants (-D
overrides) can be timed side by side in one process. Threads: plain std::threads spawned per call
(tests/cpp/parallel_threads.cpp), or OpenMP's persistent pool (parallel_openmp.cpp: no spawn
cost in the timings). With torch imported first, the library binds to torch's libgomp (same
SONAME, already loaded), so torch.set_num_threads sets its thread count too."""
import ctypes
import os
import subprocess

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
SOURCES = ("csrc/cpu/decode_kernels.cpp", "csrc/cpu/isa.cpp")
# The weights one decode step of a Llama-138M reads (hidden 768, 12 layers with fused qkv and
# gate/up, the 32000-row head: 551 MB fp32), as (out_features, in_features).
LLAMA_138M_STEP_SHAPES = [(2304, 768), (768, 768), (6144, 768), (768, 3072)] * 12 + [(32000, 768)]
# A shim exposing decode_linear at M = 1, fp32, without bias: linear_m1(w, x, y, n, k).
LINEAR_M1_SHIM = """
#include "mmfast/cpu/decode.h"
extern "C" void linear_m1(const float* w, const float* x, float* y, long n, long k) {
  mmfast::DecodeLinearParams p;
  p.rows = 1, p.in_features = k, p.out_features = n, p.x = x, p.x_row_stride = k;
  p.weight = w, p.bias = nullptr, p.y = y;
  mmfast::cpu::decode_kernels().linear(p);
}
"""
THREADS = {"std": ["tests/cpp/parallel_threads.cpp"],
           "openmp": ["-fopenmp", os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_openmp.cpp")]}


def build_decode_kernels(directory, shim_source, defines, root=ROOT, threads="std"):
    """Builds shim_source + the decode kernels of `root` with `defines` (["-DNAME=VALUE", ...])
    into a new shared library in `directory` and loads it. threads: "std" or "openmp"."""
    index = len(os.listdir(directory))
    shim = os.path.join(directory, f"shim{index}.cpp")
    with open(shim, "w") as f:
        f.write(shim_source)
    out = os.path.join(directory, f"variant{index}.so")
    sources = [shim] + [os.path.join(root, path) for path in SOURCES]
    sources += [arg if arg.startswith("-") or os.path.isabs(arg) else os.path.join(root, arg) for arg in THREADS[threads]]
    subprocess.run(["g++", "-std=c++17", "-O3", "-fno-math-errno", "-shared", "-fPIC", "-pthread",
                    f"-I{os.path.join(root, 'csrc/include')}", *defines, "-o", out, *sources], check=True)
    return ctypes.CDLL(out)


def linear_m1_calls(weights):
    """(ctypes arguments of linear_m1 (LINEAR_M1_SHIM) for each (N, K) fp32 weight, the x and y
    tensors they point into): random x rows shared by the weights of one K, one output per weight.
    Keep the tensors alive while the arguments are used."""
    import ctypes

    import torch

    xs = {k: torch.randn(k) for k in {w.shape[1] for w in weights}}
    ys = [torch.empty(w.shape[0]) for w in weights]
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
    calls = [(ptr(w), ptr(xs[w.shape[1]]), ptr(y), ctypes.c_long(w.shape[0]), ctypes.c_long(w.shape[1]))
             for w, y in zip(weights, ys)]
    return calls, (xs, ys)
