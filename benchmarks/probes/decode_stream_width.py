"""Probe (2026-12-05): decode_linear's M = 1 stream built with other vector widths / chain counts
(-D overrides of MMFAST_DECODE_STREAM_VECTOR_BYTES, MMFAST_DECODE_STREAM_CHAINS), the 49 calls of a
Llama-138M decode step (_torch_free.LLAMA_138M_STEP_SHAPES, 551 MB fp32) with the weights on
transparent huge pages (as LiquidLM.from_pretrained puts them), against a torch sum of as many
bytes, also on huge pages. Every variant is this checkout's torch-free decode kernels built with
g++ (benchmarks/probes/_torch_free.py) and loaded side by side. BLOCKS blocks (default 12) of 10
shuffled rounds, 10 s apart, so that the VM's slow and fast bandwidth phases both show; one line
per block: the read's GB/s and each variant's median per-round ratio to the read.
Results: benchmarks/results/2026-12-05-cpu-amd-epyc-2core-avx512-decode-linear-stream-width.md
Run: .venv/bin/python benchmarks/probes/decode_stream_width.py \\
         -DMMFAST_DECODE_STREAM_VECTOR_BYTES=64,-DMMFAST_DECODE_STREAM_CHAINS=4 ...
(one argument per variant, its -D flags joined by commas; about 1 min to build each variant,
then about 1 min per 6 blocks)"""
import os
import statistics
import sys
import tempfile
import time

import torch

import mmfast  # noqa: F401  (registers torch.ops.mmfast)
from _rounds import time_rounds
from _torch_free import LINEAR_M1_SHIM, LLAMA_138M_STEP_SHAPES, ROOT, build_decode_kernels, linear_m1_calls
from mmfast.memory import huge_page_empty


def main():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    total = sum(n * k for n, k in LLAMA_138M_STEP_SHAPES)
    store, floor = huge_page_empty((total,)).normal_(), huge_page_empty((total,)).fill_(1)
    weights, offset = [], 0
    for n, k in LLAMA_138M_STEP_SHAPES:
        weights.append(store[offset:offset + n * k].view(n, k))
        offset += n * k
    calls, _buffers = linear_m1_calls(weights)
    with tempfile.TemporaryDirectory() as directory:
        libs = {"default": build_decode_kernels(directory, LINEAR_M1_SHIM, [], ROOT, threads="openmp")}
        for variant in sys.argv[1:]:
            name = variant.replace("-DMMFAST_DECODE_STREAM_", "")
            libs[name] = build_decode_kernels(directory, LINEAR_M1_SHIM, variant.split(","), ROOT, threads="openmp")
        contenders = {"read": floor.sum}
        for name, lib in libs.items():
            contenders[name] = (lambda lib: lambda: [lib.linear_m1(*c) for c in calls])(lib)
        print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads; 49 calls / read", flush=True)
        for block in range(int(os.environ.get("BLOCKS", "12"))):
            times = time_rounds(contenders, 10)
            line = f"read {total * 4 / statistics.median(times['read']) / 1e9:5.1f} GB/s"
            for name in libs:
                line += f" | {name} {statistics.median(a / b for a, b in zip(times[name], times['read'])):.3f}x"
            print(line, flush=True)
            time.sleep(10)


if __name__ == "__main__":
    main()
