"""Probe (2026-12-05): the batch-1 LiquidLM decode step of bench_liquid_generate.py (Llama-138M,
fp32, compiled as DecodeStep(compile=True) does) with dynamo's guards evaluated on every call
(MMFAST_DECODE_SKIP_GUARDS=0) against only the differentiating ones (the default: DecodeStep runs
its second and later calls under torch.compiler.set_stance(skip_guard_eval_unsafe=True)).
Each round: a fresh DecodeStep per setting (its first call evaluates every guard), then 10 timed
steps; the two settings alternate in shuffled rounds in one process. Prints the medians and the
median per-round difference (guards evaluated - skipped), in ms per step.
Results: benchmarks/results/2026-12-05-cpu-amd-epyc-2core-avx512-liquid-step-guards.md.
Run: cd benchmarks && ../.venv/bin/python probes/decode_step_guards_ab.py  (about 2 min)"""
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rounds import time_rounds  # noqa: E402
from bench_liquid_generate import PROMPT, llama_134m  # noqa: E402

from mmfast.models.liquid import DecodeStep, LiquidLM  # noqa: E402


def main(rounds=60, steps=10):
    with tempfile.TemporaryDirectory() as directory:
        llama_134m().save_pretrained(directory, safe_serialization=True)
        lm = LiquidLM.from_pretrained(directory)
    prompt = torch.randint(3, lm.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    lm.setup_caches(1, PROMPT + rounds * 2 * (steps + 1) + 8)
    state = {}

    def setting(value):
        def run():
            os.environ["MMFAST_DECODE_SKIP_GUARDS"] = value
            step = DecodeStep(lm, compile=True)  # reuses the model's compiled step
            state["token"] = step(state["token"]).argmax(-1, keepdim=True)  # first call: every guard
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                state["token"] = step(state["token"]).argmax(-1, keepdim=True)
                times.append(time.perf_counter() - start)
            state.setdefault(value, []).append(statistics.median(times) * 1e3)
        return run

    with torch.inference_mode():
        state["token"] = lm.prefill(prompt).argmax(-1, keepdim=True)
        DecodeStep(lm, compile=True)(state["token"])  # compiles
        time_rounds({"evaluated": setting("0"), "skipped": setting("1")}, rounds)
    evaluated, skipped = state["0"], state["1"]
    diffs = sorted(a - b for a, b in zip(evaluated, skipped))
    diff, quartiles = statistics.median(diffs), (diffs[len(diffs) // 4], diffs[3 * len(diffs) // 4])
    print(f"CPU ISA {torch.ops.mmfast.cpu_isa()}, {torch.get_num_threads()} threads, {rounds} rounds of {steps} steps")
    print(f"guards evaluated {statistics.median(evaluated):.3f} ms/step, differentiating only "
          f"{statistics.median(skipped):.3f} ms/step; per-round difference {diff:.3f} ms "
          f"(quartiles {quartiles[0]:.3f} to {quartiles[1]:.3f})")


if __name__ == "__main__":
    main()
