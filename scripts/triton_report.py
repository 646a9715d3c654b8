#!/usr/bin/env python3
"""Registers, spills and shared memory of the Triton linear-attention, VQ-search and masked-conv
kernels for sm_90, per launch config, without a GPU.

    python scripts/triton_report.py [--dims 40,64,...] [--dtypes bf16,...] [--json PATH] [--markdown PATH]

Compiles every kernel of python/mmfast/triton/linear_attention_kernels.py, the search kernel
of vq_kernels.py and the conv kernel of pruned_kernels.py (its GPU tiles; D is ignored), offline (triton.compile with GPUTarget("cuda", 90, 32), Triton's own ptxas)
with the constexprs the launches use on a GPU (outer_sum_meta, apply_meta, apply_backward_dq_meta,
search_meta) for each head dim D (Dk = Dv; the VQ code dim) and token dtype, once per
(num_warps, num_stages) of the kernel's autotune sweep (LAUNCH_SWEEPS, vq.LAUNCH_SWEEP), and
reads the cubin's resource usage (cuobjdump -res-usage, found as sass_report finds it; Triton
ships one): registers per thread, stack bytes (spills), static + dynamic shared memory, and blocks
per SM on an H100/H200 (sass_report.occupancy with sm_90's limits). --loops also prints each
compiled kernel's loops by instruction class (sass_report.loops_of).

Why: the sweeps should hold only configs worth timing. A config that spills at a common D
costs local-memory traffic in a bandwidth-bound kernel; one that does not fit shared memory
fails to launch (the autotuner skips it, but it still costs a compile on the first call).

Run as a script it sets TRITON_INTERPRET=0 before Triton is imported: the interpreter cannot compile.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

if "triton" not in sys.modules:  # run as a script (tests import it under the interpreter: leave that be)
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_report  # noqa: E402  (occupancy, the tool lookup)

from mmfast.triton import linear_attention as host  # noqa: E402
from mmfast.triton import linear_attention_kernels as kernels  # noqa: E402
from mmfast.triton import pruned as pruned_host  # noqa: E402
from mmfast.triton import pruned_kernels  # noqa: E402
from mmfast.triton import vq as vq_host  # noqa: E402
from mmfast.triton import vq_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = sass_report.find_tool("cuobjdump", os.environ.get("CUDA_HOME"))  # Triton ships one
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Pointer arguments that hold tokens (the input dtype); every other pointer is fp32, but these.
TOKEN_POINTERS = {"a_ptr", "b_ptr", "q_ptr", "o_ptr", "do_ptr", "dq_ptr", "k_ptr", "v_ptr", "dk_ptr", "dv_ptr",
                  "z_ptr", "c_ptr", "x_ptr", "w_ptr", "bias_ptr", "y_ptr"}
# The linear-attention dS / dm launch passes the forward's z (fp32), VQ's z is the tokens.
FP32_POINTERS_OF = {"outer_sum_kernel": {"z_ptr"}}
OTHER_POINTERS = {"code_ptr": "*i64", "codes_ptr": "*i64", "in_list_ptr": "*i32", "in_count_ptr": "*i32",
                  "out_list_ptr": "*i32", "out_count_ptr": "*i32"}
FLOAT_SCALARS = {"eps", "inv_n"}


@dataclasses.dataclass(frozen=True)
class Role:
    label: str  # what the launch computes
    kernel: str  # the kernel's name
    jit: object  # the triton.jit function
    sweep: list  # its (num_warps, num_stages) autotune sweep
    meta: object  # (d, dtype, feature_map) -> constexprs
    family: str = "linear_attention"  # what --kernels selects


def _la(label: str, name: str, meta) -> Role:
    return Role(label, name, getattr(kernels, name), host.LAUNCH_SWEEPS[name], meta)


def _conv_meta(dtype: torch.dtype) -> dict:
    """The masked-conv launch's constexprs on a GPU (pruned._launch_conv), for a conv over a
    contiguous x and y: Triton specialises their unit strides (== 1) into constants."""
    block_p, block_o, block_i = pruned_host._BLOCKS_GPU
    return dict(HAS_BIAS=True, DOT_PREC="tf32x3" if dtype == torch.float32 else None, UPCAST=False,
                BLOCK_P=block_p, BLOCK_O=block_o, BLOCK_I=block_i, s_x3=1, s_yp=1)


ROLES = [
    _la("state (S, m)", "outer_sum_kernel", lambda d, t, fm: host.outer_sum_meta(d, d, t, fm, weighted=False)),
    _la("apply", "apply_kernel", lambda d, t, fm: host.apply_meta(d, d, t, fm)),
    _la("apply_backward dq", "apply_backward_dq_kernel", lambda d, t, fm: host.apply_backward_dq_meta(d, d, t, fm)),
    _la("apply_backward dS, dm", "outer_sum_kernel", lambda d, t, fm: host.outer_sum_meta(d, d, t, fm, weighted=True)),
    _la("state_backward dk", "state_backward_dk_kernel", lambda d, t, fm: host.apply_meta(d, d, t, fm)),
    _la("state_backward dv", "state_backward_dv_kernel", lambda d, t, fm: host.apply_meta(d, d, t, fm)),
    Role("vq search", "search_kernel", vq_kernels.search_kernel, vq_host.LAUNCH_SWEEP,
         lambda d, t, fm: vq_host.search_meta(d, t), "vq"),
    Role("masked conv", "conv_kernel", pruned_kernels.conv_kernel, pruned_host.CONV_SWEEP,
         lambda d, t, fm: _conv_meta(t), "pruned"),
]


def signature(kernel, dtype: torch.dtype, meta: dict) -> tuple[dict, dict]:
    """(signature, constexprs) for ASTSource from the kernel's argument names."""
    sig, constexprs = {}, {}
    for name in kernel.arg_names:
        if name in meta:
            sig[name], constexprs[name] = "constexpr", meta[name]
        elif name.endswith("_ptr"):
            token = name in TOKEN_POINTERS and name not in FP32_POINTERS_OF.get(kernel.__name__, ())
            sig[name] = OTHER_POINTERS.get(name, "*" + (TYPE_NAMES[dtype] if token else "fp32"))
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    missing = [n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr and n not in meta]
    if missing:
        raise ValueError(f"{kernel.arg_names}: no value for the constexprs {missing}")
    return sig, constexprs


def parse_resource_usage(text: str) -> dict:
    """REG, STACK, SHARED (static bytes) and LOCAL of the one function in `cuobjdump -res-usage` output."""
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if match is None:
        raise ValueError(f"no resource usage in cuobjdump output: {text!r}")
    return dict(zip(("registers", "stack", "static_smem", "local"), map(int, match.groups())))


def compile_one(role: Role, d: int, dtype: torch.dtype, config: tuple[int, int], feature_map: str = "elu1",
                loops: bool = False) -> dict:
    if CUOBJDUMP is None:
        raise RuntimeError("triton_report: cuobjdump not found on PATH, in $CUDA_HOME/bin, in a pip nvidia-* wheel "
                           "or in Triton's backend")
    kernel = role.jit
    sig, constexprs = signature(kernel, dtype, role.meta(d, dtype, feature_map))
    warps, stages = config
    compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=TARGET,
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = parse_resource_usage(subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                                                    text=True, check=True).stdout)
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout if loops else ""
    smem = usage["static_smem"] + compiled.metadata.shared
    row = dict(role=role.label, kernel=role.kernel, d=d, dtype=TYPE_NAMES[dtype], num_warps=warps,
               num_stages=stages, registers=usage["registers"], spill_bytes=usage["stack"] + usage["local"],
               smem=smem, blocks_per_sm=sass_report.occupancy(usage["registers"], smem, 32 * warps).blocks_per_sm)
    if loops:
        function = next(iter(sass_report.parse_sass(sass).values()))
        row["loops"] = [dataclasses.asdict(loop) for loop in sass_report.loops_of(function)]
    return row


def cell(row: dict) -> str:
    spill = f", **{row['spill_bytes']} B spill**" if row["spill_bytes"] else ""
    return f"{row['registers']} r, {row['smem'] // 1024} KB, {row['blocks_per_sm']}/SM{spill}"


def markdown(rows: list[dict]) -> str:
    configs = sorted({(r["num_warps"], r["num_stages"]) for r in rows}, key=lambda c: (-c[0], c[1]))
    head = "| kernel | D | dtype | " + " | ".join(f"{w} warps, {s} stages" for w, s in configs) + " |"
    out = [head, "|" + "---|" * (3 + len(configs))]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["role"], r["d"], r["dtype"]), {})[(r["num_warps"], r["num_stages"])] = r
    for (role, d, dtype), cells in by_key.items():
        out.append(f"| {role} | {d} | {dtype} | " + " | ".join(cell(cells[c]) if c in cells else "-"
                                                                for c in configs) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="40,64,80,128,160,256")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--configs", help="num_warps:num_stages,... to compile instead of each kernel's sweep")
    parser.add_argument("--kernels", default="all", help="'linear_attention', 'vq', 'pruned' or 'all'")
    parser.add_argument("--loops", action="store_true", help="also print each kernel's loops by instruction class")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    dtypes = {v: k for k, v in TYPE_NAMES.items()}
    configs = [tuple(map(int, c.split(":"))) for c in args.configs.split(",")] if args.configs else None
    rows = []
    roles = [r for r in ROLES if args.kernels in ("all", r.family)]
    if not roles:
        sys.exit(f"triton_report: --kernels must be linear_attention, vq, pruned or all, got {args.kernels!r}")
    for role in roles:
        for d in map(int, args.dims.split(",")) if role.family != "pruned" else [0]:
            for name in args.dtypes.split(","):
                for config in configs or role.sweep:
                    rows.append(compile_one(role, d, dtypes[name], config, loops=args.loops))
                    print(cell(rows[-1]), role.label, d, name, config, file=sys.stderr)
                    if args.loops:
                        title = f"{role.kernel} ({role.label}) D={d} {name} {config[0]} warps {config[1]} stages"
                        print(sass_report.loops_table(title, [sass_report.Loop(**loop) for loop in rows[-1]["loops"]]),
                              file=sys.stderr)
    command = " ".join(["python scripts/triton_report.py", *(argv if argv is not None else sys.argv[1:])])
    text = (f"`{command}`: Triton {triton.__version__}, sm_90 (offline compile), feature map elu + 1, "
            "Dk = Dv = D (VQ: the code dim). Per config: registers per thread, shared memory, blocks per SM, spills.\n\n"
            + markdown(rows))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
