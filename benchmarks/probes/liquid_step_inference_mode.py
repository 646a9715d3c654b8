"""Probe (2026-12-04): the batch-1 LiquidLM decode step of bench_liquid_generate.py (Llama-138M,
fp32, compiled with torch.compile as DecodeStep does) run under torch.no_grad against the same
step under torch.inference_mode, in one process. Under no_grad every call of an op that has a
Python autograd kernel (torch.library.register_autograd: decode_linear, decode_attention) still
enters that kernel (~4.5 us a call here); inference_mode takes the Autograd key out of dispatch.
Each figure: the median over 8 alternating blocks of 20 pairs of (one step / a read of the
step's floor bytes right after it), the benchmark's paired ratio (target <= 1.25x).
Results: benchmarks/results/2026-12-04-cpu-amd-epyc-2core-avx2-liquid-step-inference-mode.md.
Run: cd benchmarks && ../.venv/bin/python probes/liquid_step_inference_mode.py  (about 1.5 min)"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from bench_liquid_generate import PROMPT, llama_134m, weight_bytes  # noqa: E402

from mmfast.models.liquid import LiquidLM  # noqa: E402

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def main(blocks=8, pairs=20):
    hf = llama_134m()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory, safe_serialization=True)
        lm = LiquidLM.from_pretrained(directory)
    config = lm.config
    prompt = torch.randint(3, config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    lm.setup_caches(1, PROMPT + 2 * pairs + 4)
    kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * (PROMPT + pairs)
    floor_read = torch.ones((weight_bytes(hf, config.vocab_size) + kv_bytes) // 4)

    def decode(tokens):
        return lm.decode_step(tokens)[:, -1]

    step = torch.compile(decode, fullgraph=True, dynamic=False)  # one cache entry per grad mode
    ratios = {name: [] for name in MODES}

    def block(name, count):
        with MODES[name]():
            token = lm.prefill(prompt).argmax(-1, keepdim=True)
            step(token)  # compiles on the first block of each mode
            for _ in range(count):
                start = time.perf_counter()
                token = step(token).argmax(-1, keepdim=True)
                middle = time.perf_counter()
                floor_read.sum()
                ratios[name].append((middle - start) / (time.perf_counter() - middle))

    for name in MODES:
        block(name, 3)
        ratios[name].clear()
    names = list(MODES)
    for i in range(blocks):
        for name in names if i % 2 == 0 else names[::-1]:
            block(name, pairs)
    print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads; step / floor read, paired")
    for name, values in ratios.items():
        values.sort()
        quartiles = values[len(values) // 4], values[3 * len(values) // 4]
        print(f"{name:15s} {statistics.median(values):.3f}x  (quartiles {quartiles[0]:.3f}-{quartiles[1]:.3f})")


if __name__ == "__main__":
    main()
