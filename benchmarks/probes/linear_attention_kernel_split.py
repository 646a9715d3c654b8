"""Where the linear attention's GPU time goes, kernel by kernel (torch.profiler / CUPTI).

For each shape: the forward (no grad) and the backward alone (one retained forward graph, its
backward again and again) run ITERS times after a warm-up under the profiler; per CUDA kernel
it prints the calls per iteration and the mean microseconds per call, and per direction the
total, the floor bytes (forward: q, k, v, out; backward: q, k, v, grad_out, dq, dk, dv) and the
GB/s they make. With --variants the same runs repeat in subprocesses under the A/B switches:
MMFAST_CUDA_LA_BACKWARD_FUSED=0 (apply_backward's dS and dm by the state pass afterwards, not in
its tile kernel), MMFAST_CUDA_LA_BACKWARD_3BLOCKS=1 (the backward's 3-block variant at 64-wide
tiles; unfused too) and MMFAST_CUDA_ASYNC_COPY=0 (the register-staged kernels).

    python benchmarks/probes/linear_attention_kernel_split.py [--json PATH] [--variants]

With --ncu-target it is instead a program for Nsight Compute to profile (`ncu
--profile-from-start off ...`, as gpu_lease.sh's ncu phase runs it): one forward and one
backward of the first shape between cudaProfilerStart and cudaProfilerStop, after a warm-up.

Needs a CUDA GPU and the built extension (python/ on PYTHONPATH).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch
from torch.profiler import ProfilerActivity, profile

SHAPES = [  # name, B, N, H, D
    ("large-N256K", 1, 262144, 10, 64),
    ("sd15-L0-2048px", 2, 65536, 8, 40),
    ("sd15-L1-2048px", 2, 16384, 8, 80),
    ("sd15-L2-4096px", 2, 16384, 8, 160),
]
ITERS = 10
VARIANTS = {
    "unfused": {"MMFAST_CUDA_LA_BACKWARD_FUSED": "0"},
    "3blocks": {"MMFAST_CUDA_LA_BACKWARD_3BLOCKS": "1"},
    "register-staged": {"MMFAST_CUDA_ASYNC_COPY": "0"},
}


def short_name(kernel: str) -> str:
    """void ns::la_backward_async_kernel<ns::Config<__nv_bfloat16, (FeatureMap)1, true>,
    (ns::BackwardPass)0, 64, 3>(ns::PairArgs) -> la_backward_async_kernel<1,true,0,64,3>: the name
    and the template arguments that are numbers or bools, enough to tell the variants apart."""
    name = re.sub(r"^void ", "", kernel)
    name = name[:name.rfind("(")] if name.endswith(")") else name  # the parameter list
    base = name.split("<")[0].split("::")[-1]
    numbers = re.findall(r"(?:, |<)(?:\([^()]*\))?(\d+|true|false)(?=[,>])", name)
    return f"{base}<{','.join(numbers)}>" if numbers else base


def kernel_table(run) -> dict:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            run()
        torch.cuda.synchronize()
    rows = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = getattr(event, "cuda_time_total", 0)
        if not total or getattr(event, "device_type", None) not in (None, torch.autograd.DeviceType.CUDA):
            continue
        key = short_name(event.key)
        row = rows.setdefault(key, {"calls_per_iter": 0.0, "us_per_iter": 0.0})
        row["calls_per_iter"] += event.count / ITERS
        row["us_per_iter"] += total / ITERS
    for row in rows.values():
        row["us_per_call"] = round(row["us_per_iter"] / max(row["calls_per_iter"], 1e-9), 2)
        row["us_per_iter"] = round(row["us_per_iter"], 2)
        row["calls_per_iter"] = round(row["calls_per_iter"], 2)
    return rows


def measure() -> list:
    from mmfast import ops

    results = []
    for name, b, n, h, d in SHAPES:
        make = lambda grad=False: torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                              requires_grad=grad)
        q, k, v = make(), make(), make()
        with torch.no_grad():
            forward = lambda: ops.linear_attention(q, k, v)  # noqa: E731
            for _ in range(3):
                forward()
            fwd = kernel_table(forward)
        inputs = (make(True), make(True), make(True))
        grad_out = make()
        out = ops.linear_attention(*inputs)
        backward = lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True)  # noqa: E731
        for _ in range(3):
            backward()
        bwd = kernel_table(backward)
        element = 2 * b * n * h * d
        for direction, table, tensors in (("forward", fwd, 4), ("backward", bwd, 7)):
            total = sum(row["us_per_iter"] for row in table.values())
            results.append({"shape": f"{name} B={b} N={n} H={h} D={d}", "direction": direction,
                            "total_us": round(total, 2), "floor_bytes": tensors * element,
                            "floor_gb_per_s": round(tensors * element / (total * 1e3), 1) if total else None,
                            "kernels": table})
        del q, k, v, inputs, grad_out, out
        torch.cuda.empty_cache()
    return results


def ncu_target() -> None:
    """One forward and one backward of SHAPES[0] inside the profiler range (warmed up first)."""
    from mmfast import ops

    _, b, n, h, d = SHAPES[0]
    inputs = [torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16)
    for profiled in (False, True):
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        out = ops.linear_attention(*inputs)
        torch.autograd.grad(out, inputs, grad_out)
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()


def print_results(variant: str, results: list) -> None:
    for result in results:
        print(f"\n[{variant}] {result['shape']} {result['direction']}: {result['total_us']} us, "
              f"{result['floor_gb_per_s']} GB/s of floor bytes")
        for kernel, row in sorted(result["kernels"].items(), key=lambda item: -item[1]["us_per_iter"]):
            print(f"  {row['us_per_iter']:>10.1f} us/iter  {row['calls_per_iter']:>5} calls  "
                  f"{row['us_per_call']:>10.1f} us/call  {kernel}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every variant's results here")
    parser.add_argument("--variants", action="store_true", help="also under the A/B switches (subprocesses)")
    parser.add_argument("--ncu-target", action="store_true", help="one profiled forward + backward, for ncu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("linear_attention_kernel_split: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.ncu_target:
        ncu_target()
        return 0
    results = measure()
    if args.child:
        print("JSON:" + json.dumps(results))
        return 0
    everything = {"default": results}
    print_results("default", results)
    if args.variants:
        for variant, env in VARIANTS.items():
            child = subprocess.run([sys.executable, __file__, "--child"], env={**os.environ, **env},
                                   capture_output=True, text=True)
            line = next((l for l in child.stdout.splitlines() if l.startswith("JSON:")), None)
            if child.returncode != 0 or line is None:
                print(f"[{variant}] failed: {child.stderr[-2000:]}")
                continue
            everything[variant] = json.loads(line[5:])
            print_results(variant, everything[variant])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": ITERS,
                       "results": everything}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
