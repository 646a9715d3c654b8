"""scripts/sass_report.py's pure analysis on hand-written SASS in cuobjdump's format: the load
memory-level-parallelism metric, regions, widths, counts, ptxas / ELF parsing, names and
occupancy. Needs no nvcc and no GPU."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "sass_report.py"
_SPEC = importlib.util.spec_from_file_location("sass_report", _PATH)
sr = importlib.util.module_from_spec(_SPEC)
sys.modules["sass_report"] = sr  # dataclasses look their module up by name
_SPEC.loader.exec_module(sr)


def sass(*lines: str, start: int = 0) -> str:
    """cuobjdump -sass lines (each followed by its control-word line) from 'OPCODE args'."""
    out = []
    for i, line in enumerate(lines):
        if line.startswith("."):  # an nvdisasm label
            out.append(line)
            continue
        addr = start + 0x10 * i
        out.append(f"        /*{addr:04x}*/                   {line} ;{' ' * 20}/* 0x000fe20000000a00 */")
        out.append(f"{' ' * 103}/* 0x000fe20000000a00 */")
    return "\n".join(out)


def only_function(text: str) -> sr.Function:
    functions = sr.parse_sass(text)
    assert list(functions) == [""]
    return functions[""]


def mlp(text: str, kinds=sr.GLOBAL_KINDS) -> tuple[int, int]:
    return sr.function_mlp(only_function(text), kinds)


# ---- the load MLP metric ---------------------------------------------------------------------
def test_loads_consumed_immediately_count_one():
    text = sass("LDG.E.U16 R4, desc[UR4][R2.64]",
                "HADD2.F32 R5, -RZ, R4.H0_H0",
                "LDG.E.U16 R6, desc[UR4][R2.64+0x2]",
                "HADD2.F32 R7, -RZ, R6.H0_H0",
                "EXIT")
    assert mlp(text) == (1, 2)


def test_four_independent_16_byte_loads_then_use():
    text = sass("LDG.E.128 R4, desc[UR4][R2.64]",
                "LDG.E.128 R8, desc[UR4][R2.64+0x10]",
                "LDG.E.128 R12, desc[UR4][R2.64+0x20]",
                "LDG.E.128 R16, desc[UR4][R2.64+0x30]",
                "FADD R20, R7, R9",  # R7: the last register of the first 16-byte load
                "EXIT")
    assert mlp(text) == (4, 64)
    stats = sr.analyze_function(only_function(text))
    assert (stats.global_loads, stats.loads_16b, stats.mlp_loads, stats.mlp_bytes) == (4, 4, 4, 64)


def test_loads_still_in_flight_after_a_use_are_counted():
    # The use of R4 retires one load; R5 and the next three are then in flight together.
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                "FADD R20, R4, R4",
                "LDG.E R6, desc[UR4][R2.64+0x8]",
                "LDG.E R7, desc[UR4][R2.64+0xc]",
                "LDG.E R8, desc[UR4][R2.64+0x10]",
                "FADD R21, R5, R6",
                "EXIT")
    assert mlp(text) == (4, 16)


def test_address_from_a_load_is_a_use():
    text = sass("LDG.E.64 R2, desc[UR4][R4.64]",
                "LDG.E R6, desc[UR4][R2.64]",  # pointer chasing: waits for the first load
                "EXIT")
    assert mlp(text) == (1, 8)


def test_overwriting_a_loaded_register_is_a_use():
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                "MOV R5, RZ",
                "EXIT")
    assert mlp(text) == (2, 8)


def test_widths_from_the_opcode_suffix():
    widths = {"LDG.E.U8": 1, "LDG.E.S8": 1, "LDG.E.U16": 2, "LDG.E.S16": 2, "LDG.E": 4, "LDG.E.CONSTANT": 4,
              "LDG.E.64": 8, "LDG.E.128": 16, "LDG.E.128.CONSTANT": 16, "LDGSTS.E.BYPASS.LTC128B.128": 16,
              "LDGSTS.E.LTC128B": 4}
    assert {op: sr.access_bytes(op) for op in widths} == widths


def test_branch_ends_a_region():
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                "@P0 BRA 0x40",
                "LDG.E R6, desc[UR4][R2.64+0x8]",
                "FADD R20, R4, R6",  # 0x40, the branch target
                "EXIT")
    assert mlp(text) == (2, 8)
    assert [len(r) for r in sr.split_regions(only_function(text))] == [3, 1, 2]


def test_branch_target_starts_a_region():
    # 0x30 is the target of the backward branch: a loop head, so the loads before it do not
    # overlap with the ones after it.
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                "IADD3 R2, R2, 0x10, RZ",
                "LDG.E R6, desc[UR4][R2.64+0x8]",
                "FADD R20, R4, R6",
                "@P0 BRA 0x30",
                "EXIT")
    function = only_function(text)
    assert function.targets == {0x30}
    assert [r[0].addr for r in sr.split_regions(function)] == [0x0, 0x30, 0x60]
    assert mlp(text) == (2, 8)


def test_label_starts_a_region():
    # nvdisasm prints jump targets as labels.
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                ".L_x_1:",
                "LDG.E R6, desc[UR4][R2.64+0x8]",
                "FADD R20, R4, R6",
                "BRA `(.L_x_1)")
    assert mlp(text) == (2, 8)


def test_barrier_and_exit_end_regions():
    text = sass("LDG.E R4, desc[UR4][R2.64]",
                "BAR.SYNC.DEFER_BLOCKING 0x0",
                "LDG.E R5, desc[UR4][R2.64+0x4]",
                "@!P0 EXIT",
                "LDG.E R6, desc[UR4][R2.64+0x8]")
    assert [len(r) for r in sr.split_regions(only_function(text))] == [2, 2, 1]
    assert mlp(text) == (1, 4)


def test_ldgsts_in_flight_until_depbar():
    text = sass("LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64]",
                "LDGSTS.E.BYPASS.LTC128B.128 [R3+0x400], desc[UR4][R4.64+0x10]",
                "LDGSTS.E.BYPASS.LTC128B.128 [R3+0x800], desc[UR4][R4.64+0x20]",
                "LDGDEPBAR",
                "LDGSTS.E.BYPASS.LTC128B.128 [R3+0xc00], desc[UR4][R4.64+0x30]",
                "LDGDEPBAR",
                "DEPBAR.LE SB0, 0x1",
                "LDGSTS.E [R3+0x1000], desc[UR4][R6.64]",
                "DEPBAR.LE SB0, 0x0",
                "LDS.128 R8, [R3]")
    assert mlp(text) == (4, 64)
    stats = sr.analyze_function(only_function(text))
    assert (stats.global_loads, stats.async_copies, stats.loads_16b, stats.lds) == (5, 5, 4, 1)


def test_cp_async_ring_depth_and_group_bytes():
    # a 6-stage ring: 4 commits in the prologue, then wait_group 4, two 16-byte copies per group
    ring = ["LDGSTS.E.BYPASS.128 [R22], desc[UR14][R44.64], P2",
            "LDGSTS.E.BYPASS.128 [R22+0x5000], desc[UR14][R44.64], P1",
            "LDGDEPBAR"]
    text = sass(*(ring * 4), "DEPBAR.LE SB0, 0x4", "BAR.SYNC.DEFER_BLOCKING 0x0", *ring, "LDS.U16 R8, [R3]", "EXIT")
    function = only_function(text)
    assert sr.async_pipeline(function) == (4, 2, 32)
    stats = sr.analyze_function(function)
    assert (stats.pipelined_loads, stats.pipelined_bytes) == (8, 128)
    row = {"mlp_loads": stats.mlp_loads, "mlp_bytes": stats.mlp_bytes, "pipelined_loads": 8, "pipelined_bytes": 128}
    assert sr.meets_mlp_target(row)
    assert not sr.meets_mlp_target({**row, "pipelined_loads": 2, "pipelined_bytes": 32, "mlp_loads": 2,
                                    "mlp_bytes": 32})


def test_ring_loop_is_the_innermost_loop_around_the_wait():
    text = sass("MOV R1, RZ",                      # 0x00
                "LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64]",  # 0x10: outer loop head
                "LDGDEPBAR",                       # 0x20: inner loop head
                "DEPBAR.LE SB0, 0x2",              # 0x30
                "FADD R6, R6, R7",                 # 0x40
                "@P0 BRA 0x20",                    # 0x50: the inner loop, 4 instructions
                "@P1 BRA 0x10",                    # 0x60: the outer loop
                "EXIT")
    assert sr.ring_loop_instructions(only_function(text)) == 4
    assert sr.ring_loops(only_function(text)) == [4, 2]  # the outer loop's own: its head and its branch
    assert sr.analyze_function(only_function(text)).ring_outer_instructions == 2
    assert sr.ring_loop_instructions(only_function(sass("FADD R1, R2, R3", "EXIT"))) == 0
    assert sr.ring_loops(only_function(sass("FADD R1, R2, R3", "EXIT"))) == []


def test_loops_nesting_and_own_instruction_classes():
    text = sass("MOV R1, RZ",                                  # 0x00
                "LDG.E R2, desc[UR4][R4.64]",                  # 0x10: outer loop head
                "STS [R3], R2",                                # 0x20: inner loop head
                "HMMA.16816.F32.BF16 R8, R12, R16, R8",        # 0x30
                "IMAD R5, R5, 0x2, RZ",                        # 0x40
                "@P0 BRA 0x20",                                # 0x50: the inner loop, 4 instructions
                "BAR.SYNC.DEFER_BLOCKING 0x0",                 # 0x60
                "@P1 BRA 0x10",                                # 0x70: the outer loop
                "EXIT")
    outer, inner = sr.loops_of(only_function(text))
    assert (outer.head, outer.tail, outer.depth, outer.total) == (0x10, 0x70, 0, 7)
    assert (inner.head, inner.tail, inner.depth, inner.total) == (0x20, 0x50, 1, 4)
    assert inner.own == {"global": 0, "shared": 1, "mma": 1, "barrier": 0, "integer": 1, "float": 0, "other": 1}
    assert outer.own == {"global": 1, "shared": 0, "mma": 0, "barrier": 1, "integer": 0, "float": 0, "other": 1}
    table = sr.loops_table("k<bf16>", [outer, inner])
    assert "| 0x10-0x70 | 7 | 3 |" in table and "| &nbsp;&nbsp;0x20-0x50 | 4 | 4 |" in table
    assert sr.loops_of(only_function(sass("FADD R1, R2, R3", "EXIT"))) == []


def test_no_cp_async_no_pipeline():
    text = sass("LDG.E.128 R4, desc[UR4][R2.64]", "FADD R20, R7, R9", "DEPBAR.LE SB1, 0x2", "EXIT")
    assert sr.async_pipeline(only_function(text)) == (0, 0, 0)


def test_probed_smem_by_template_suffix():
    probes = {"k<true>": 100, "k<false>": 50, "plain": 7}
    assert sr.probed_smem(probes, "k", "bf16, FeatureMap=1, true") == 100
    assert sr.probed_smem(probes, "k", "f16, FeatureMap=0, false") == 50
    assert sr.probed_smem(probes, "plain", "f32") == 7
    assert sr.probed_smem(probes, "other", "f32") is None


def test_dynamic_smem_probe_source():
    source = sr.probe_source({"k1": "sizeof(int)", "k2": "f<float>(64)"})
    assert f'#include "{sr.DEFAULT_HEADER}"' in source
    assert 'std::printf("k1 %zu\\n", static_cast<size_t>(sizeof(int)));' in source
    assert "static_cast<size_t>(f<float>(64))" in source and source.rstrip().endswith("}")


def test_tma_copies_count_without_bytes():
    text = sass("UTMALDG.2D [UR8], [UR4]",
                "UTMALDG.2D [UR12], [UR4]",
                "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x10], R3",
                "EXIT")
    assert mlp(text) == (2, 0)
    assert sr.analyze_function(only_function(text)).tma_copies == 2


def test_generic_loads_are_flagged_separately():
    text = sass("LD.E R4, desc[UR4][R2.64]",
                "LD.E R5, desc[UR4][R2.64+0x4]",
                "LDG.E R6, desc[UR4][R8.64]",
                "FADD R20, R4, R5",
                "FADD R21, R20, R6",
                "EXIT")
    stats = sr.analyze_function(only_function(text))
    assert (stats.global_loads, stats.generic_loads) == (1, 2)
    assert (stats.mlp_loads, stats.mlp_bytes) == (1, 4)
    assert (stats.mlp_loads_with_generic, stats.mlp_bytes_with_generic) == (3, 12)


def test_instruction_counts():
    text = sass("S2R R95, SR_SWINHI",
                "LDS.128 R8, [R3]",
                "LDS R12, [R3+0x10]",
                "LDSM.16.M88.4 R16, [R3]",
                "STS.64 [R3], R8",
                "HMMA.1684.F32.TF32 R36, R40, R43, R32",
                "HMMA.16816.F32.BF16 R20, R16, R18, R20",
                "STG.E.128 desc[UR4][R2.64], R8",
                "ST.E desc[UR4][R2.64], R8",
                "BAR.SYNC.DEFER_BLOCKING 0x0",
                "EXIT")
    stats = sr.analyze_function(only_function(text))
    counts = (stats.lds, stats.ldsm, stats.sts, stats.mma, stats.stg, stats.st_generic, stats.bar)
    assert counts == (2, 1, 1, 2, 1, 1, 1)
    assert stats.shared_window and stats.instructions == 11


def test_vector_operands_cover_several_registers():
    # LDG into R5 is read by a 64-bit store naming R4 (R4:R5) and by an f64 add naming R4.
    assert 5 in sr.registers_named(sr.Instr(0, "STG.E.64", "desc[UR4][R2.64], R4"))
    assert 5 in sr.registers_named(sr.Instr(0, "DADD", "R8, R4, R6"))
    assert sr.registers_named(sr.Instr(0, "LDS", "R8, [R3+0x4]")) == {8, 3}
    assert 3 in sr.registers_named(sr.Instr(0, "LDG.E", "R8, desc[UR4][R2.64]"))


def test_parse_functions_and_histogram():
    text = "\n".join(["\tcode for sm_90a", "\t\tFunction : _Z1fPf",
                      "\t.headerflags\t@\"EF_CUDA_SM90\"",
                      sass("LDG.E R4, desc[UR4][R2.64]", "FADD R5, R4, R4", "EXIT"),
                      "\t\t..........", "", "\t\tFunction : _Z1gPf",
                      sass("LDG.E.64 R4, desc[UR4][R2.64]", "LDG.E.64 R6, desc[UR4][R2.64+0x8]", "EXIT")])
    functions = sr.parse_sass(text)
    assert {name: len(f.instrs) for name, f in functions.items()} == {"_Z1fPf": 3, "_Z1gPf": 3}
    assert sr.function_mlp(functions["_Z1gPf"]) == (2, 16)
    assert sr.mlp_histogram(functions["_Z1fPf"]) == {1: 1}


# ---- ptxas, ELF, names, occupancy ----------------------------------------------------------
PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6mmfast4cuda2la15la_apply_kernelI6__halfEEvNS1_9ApplyArgsE' for 'sm_90a'
ptxas info    : Function properties for _ZN6mmfast4cuda2la15la_apply_kernelI6__halfEEvNS1_9ApplyArgsE
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 36096 bytes smem
ptxas info    : Compile time = 228.142 ms
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_90a'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers
"""


def test_parse_ptxas():
    resources = sr.parse_ptxas(PTXAS)
    apply = resources["_ZN6mmfast4cuda2la15la_apply_kernelI6__halfEEvNS1_9ApplyArgsE"]
    assert (apply.registers, apply.stack, apply.spill_stores, apply.spill_loads, apply.smem, apply.barriers) == \
        (255, 48, 40, 36, 36096, 1)
    assert (resources["_Z1gPf"].registers, resources["_Z1gPf"].smem) == (30, 0)


def test_parse_wgmma_serialization():
    """ptxas reports serialized wgmma instructions (no overlap between them) only as an info line."""
    text = PTXAS + ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
                    "serialized due to insufficient register resources for the wgmma pipeline in the function "
                    "'_Z1gPf'\n")
    assert sr.parse_wgmma_serialization(text) == {
        "_Z1gPf": "due to insufficient register resources for the wgmma pipeline"}
    assert sr.parse_wgmma_serialization(PTXAS) == {}


def test_parse_max_threads():
    elf = "\n".join([".nv.info._Z1gPf", "\t<0x8>", "\tAttribute:\tEIATTR_MAX_THREADS", "\tFormat:\tEIFMT_SVAL",
                     "\tValue:\t0x100 0x1 0x1 ", "\t<0x9>", "\tAttribute:\tEIATTR_CRS_STACK_SIZE",
                     "\tValue:\t0x0 "])
    assert sr.parse_max_threads(elf) == {"_Z1gPf": 256}


@pytest.mark.parametrize("demangled, expected", [
    ("void mmfast::cuda::la::la_apply_kernel<__half>(mmfast::cuda::la::ApplyArgs)", ("la_apply_kernel", "f16")),
    ("void mmfast::cuda::la::la_state_reduce_kernel<double>(double const*, double*, double*, long, long, int, int, "
     "double)", ("la_state_reduce_kernel", "f64")),
    ("void ns::k<__nv_bfloat16, (mmfast::FeatureMap)2, true>(ns::Args<float>)", ("k", "bf16, FeatureMap=2, true")),
    ("void mmfast::cuda::la::la_state_kernel<mmfast::cuda::la::Config<__nv_bfloat16, (mmfast::FeatureMap)1, true>>"
     "(mmfast::cuda::la::StateArgs)", ("la_state_kernel", "bf16, FeatureMap=1, true")),
    ("plain_kernel(int)", ("plain_kernel", "")),
])
def test_short_name(demangled, expected):
    assert sr.short_name(demangled) == expected


def test_demangle_and_group():
    names = ["_ZN6mmfast4cuda2la24la_state_backward_kernelI13__nv_bfloat16EEvNS1_17StateBackwardArgsE",
             "_ZN6mmfast4cuda2la22la_state_reduce_kernelIfEEvPKT_PS3_S6_lliid"]
    demangled = sr.demangle(names)
    if demangled[names[0]] == names[0]:
        pytest.skip("no demangler (libstdc++ / c++filt) on this machine")
    assert [sr.short_name(demangled[n]) for n in names] == [("la_state_backward_kernel", "bf16"),
                                                           ("la_state_reduce_kernel", "f32")]


def test_occupancy_sm90():
    assert sr.occupancy(184, 36096, 256) == sr.Occupancy(1, 0.125, "registers")
    assert sr.occupancy(128, 34816, 256) == sr.Occupancy(2, 0.25, "registers")
    assert sr.occupancy(30, 0, 256) == sr.Occupancy(8, 1.0, "threads+registers")
    assert sr.occupancy(32, 100 * 1024, 128).limited_by == "smem"  # 228 KB / (100 KB + 1 KB reserved)
    assert sr.occupancy(32, 100 * 1024, 128).blocks_per_sm == 2
    assert sr.occupancy(16, 0, 32) == sr.Occupancy(32, 0.5, "blocks")
    assert sr.occupancy(32, 228 * 1024, 128).blocks_per_sm == 0  # above 227 KB per block
    assert sr.occupancy(255, 0, 256).blocks_per_sm == 1
    assert sr.occupancy(255, 0, 512).blocks_per_sm == 0  # 255 x 512 > 64 K registers per block


def test_launch_sites_parsed_from_source_text():
    text = ("constexpr int kThreads = 256;\n"
            "  MMFAST_LAUNCH(la_state_kernel<T>, grid_for(items), kThreads, 0, stream, a);\n"
            "  MMFAST_LAUNCH(reduce<A, B>, grid_for(ceil_div(total, kThreads)), 128, 4096, stream,\n"
            "                x, f(y, z));\n"
            "  MMFAST_LAUNCH((ring<C, true>), grid, kThreads, smem, stream, a);\n")
    constants = {"kThreads": 256}
    assert sr.launch_sites_in(text, "x.cuh", constants) == {
        "la_state_kernel": sr.Launch(256, 0, "x.cuh:2"),
        "reduce": sr.Launch(128, 4096, "x.cuh:3"),
        "ring": sr.Launch(256, 0, "x.cuh:5"),  # parenthesized for the preprocessor's commas
    }


def test_launch_sites_of_the_linear_attention_kernels():
    sites = sr.launch_sites()
    for kernel in ("la_state_kernel", "la_state_reduce_kernel", "la_apply_kernel", "la_apply_backward_kernel",
                   "la_state_backward_kernel"):
        assert (sites[kernel].threads, sites[kernel].dynamic_smem) == (256, 0), (kernel, sites[kernel])
    probes = {key: i for i, key in enumerate(sr.DYNAMIC_SMEM_PROBES)}  # distinct bytes per probe
    for kernel, targs, key in (
            ("la_state_async_kernel", "bf16, FeatureMap=1, true, false, 64", "la_state_async_kernel<64>"),  # forward
            ("la_state_async_kernel", "bf16, FeatureMap=1, true, true, 48", "la_state_async_kernel<48>"),  # backward
            ("la_state_async_kernel", "f16, FeatureMap=2, true, false, 80", "la_state_async_kernel<80>"),
            ("la_apply_async_kernel", "bf16, FeatureMap=1, true, 64", "la_apply_async_kernel<64>"),
            ("la_apply_async_kernel", "f16, FeatureMap=0, true, 80", "la_apply_async_kernel<80>"),
            ("la_apply_async_kernel", "bf16, FeatureMap=2, true, 48", "la_apply_async_kernel<48>"),
            ("la_backward_async_kernel", "bf16, FeatureMap=1, true, BackwardPass=2, 64, 3",
             "la_backward_async_kernel<BackwardPass=2, 64, 3>"),
            ("la_backward_async_kernel", "f16, FeatureMap=0, true, BackwardPass=0, 160, 2",
             "la_backward_async_kernel<BackwardPass=0, 160, 2>")):
        # sized by the probe of its tile width (the state kernel) or head dim (apply), not the site
        assert sites[kernel].threads == 256, (kernel, sites[kernel])
        assert sr.probed_smem(probes, kernel, targs) == probes[key], (kernel, targs)


def test_notes_flag_static_shared_memory_over_48_kb():
    def row(kernel, smem):
        return {"kernel": kernel, "template_args": "", "smem": smem, "spill_stores": 0, "spill_loads": 0,
                "global_loads": 0, "threads": 256, "dynamic_smem": 0, "launch_site": "x.cuh:1"}

    flagged = [n for n in sr.notes([row("big", 57536), row("small", 45312), row("edge", 49152)], "sm_90a")
               if "static shared memory over 48 KB" in n]
    assert len(flagged) == 1 and "big 57536 B" in flagged[0]
