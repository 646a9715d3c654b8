"""Probe (2026-12-05): decode_linear's M = 1 kernel of two source trees side by side, in one
process, on a Llama-138M decode step's weights (12 layers of fused qkv 2304 x 768, o 768 x 768,
fused gate/up 6144 x 768, down 768 x 3072, and the 32000 x 768 head: 551 MB fp32) against a
torch sum of the same bytes (the read floor). Both trees' torch-free decode kernels are built
with g++ for this CPU on OpenMP's pool (benchmarks/probes/_torch_free.py), so only the kernels
differ. BASE is a git revision (exported with git archive), the other tree is this checkout.
25 rounds in shuffled order; each figure is the median of the per-round ratios to the read.
Run: .venv/bin/python benchmarks/probes/decode_linear_ab.py [BASE=HEAD [-DNAME=VALUE ...]]: with -D flags, this
checkout built with them is a third contender (about a minute per build)"""
import os
import subprocess
import sys
import tempfile

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast: cpu_isa)
from _rounds import print_ratios, time_rounds
from _torch_free import LINEAR_M1_SHIM, LLAMA_138M_STEP_SHAPES, ROOT, build_decode_kernels, linear_m1_calls



def export_tree(revision, directory):
    """The csrc/ of `revision` under directory (git archive | tar)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "csrc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
    return directory


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    weights = [torch.randn(n, k) for n, k in LLAMA_138M_STEP_SHAPES]
    total = sum(w.numel() for w in weights)
    floor_buffer = torch.ones(total)
    calls, _buffers = linear_m1_calls(weights)
    with tempfile.TemporaryDirectory() as directory:
        def build(defines, root=None):
            return build_decode_kernels(directory, LINEAR_M1_SHIM, defines, root or ROOT, threads="openmp")

        libs = {f"base ({base})": build([], export_tree(base, directory)), "this checkout": build([])}
        if len(sys.argv) > 2:  # this checkout again, built with extra -D flags
            libs["this checkout " + " ".join(sys.argv[2:])] = build(sys.argv[2:])
        contenders = {"read (floor)": floor_buffer.sum}
        for name, lib in libs.items():
            contenders[f"49 calls, {name}"] = (lambda lib: lambda: [lib.linear_m1(*c) for c in calls])(lib)
        times = time_rounds(contenders, 25)
    print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads")
    print_ratios(times, "read (floor)", total * 4, "the read")


if __name__ == "__main__":
    main()
