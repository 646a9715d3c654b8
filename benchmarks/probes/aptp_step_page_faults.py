"""Probe (2026-12-03): minor page faults and time of one AptpUNet step (bench_aptp_unet.py's
scaled SD-2.1 config, 8 rows over 5 codes): the mixed pass, one pass per expert and the dense
UNet, in turn, three times, inside keep_packed_weights (held for the whole run, unlike the
paired benchmark, which enters it per round). Faults count fresh 4 KiB pages (huge pages count
once). Run: .venv/bin/python benchmarks/probes/aptp_step_page_faults.py"""
import pathlib
import resource
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import bench_aptp_unet as bench  # noqa: E402

from mmfast.models.aptp import run_per_expert  # noqa: E402
from mmfast.ops import keep_packed_weights  # noqa: E402


def probe(name, step):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    step()
    ms = (time.perf_counter() - start) * 1e3
    print(f"{name}: {ms:.0f} ms, {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults} minor faults")


def main():
    base, experts, model = bench.models.__wrapped__()  # the benchmark's fixture, called directly
    sample, timestep, text, codes = bench.inputs()
    steps = {"mixed pass": lambda: model(sample, timestep, text, codes).sample,
             "one pass per expert": lambda: run_per_expert(experts, sample, timestep, text, codes),
             "dense UNet": lambda: base(sample, timestep, text)}
    with torch.inference_mode(), keep_packed_weights(budget_mb=4096):
        for step in steps.values():  # warm-up: packing, oneDNN primitives, allocator
            step()
        for _ in range(3):
            for name, step in steps.items():
                probe(name, step)


if __name__ == "__main__":
    main()
