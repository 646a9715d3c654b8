#!/usr/bin/env python3
"""Facts from the compiled SASS of the CUDA linear-attention kernels, without a GPU.

    python scripts/sass_report.py [--arch sm_90a] [--source FILE.cu] [--json PATH] [--keep DIR]

Compiles one .cu (default: every linear-attention kernel, a unit that includes
mmfast/cuda/linear_attention.cuh; the build splits them over two) with setup.py's nvcc flags for one
real architecture, reads ptxas' resource usage (-Xptxas -v), disassembles the cubin with
cuobjdump -sass and prints a markdown table with one row per kernel instantiation: registers,
spills, stack, shared memory, occupancy, global-load counts, the load memory-level parallelism
(below), and counts of stores, shared-memory, ldmatrix, MMA and barrier instructions.

Why: a kernel that streams tokens from HBM must keep enough bytes in flight per thread to
cover the memory latency; on H100/H200 that means issuing about four or more independent
16-byte loads per thread before the first instruction that needs one of them. Scalar loads,
or a load consumed right away, leave the kernel latency-bound at a fraction of the bandwidth.

The metric (load MLP): the SASS of each kernel is cut into straight-line regions; a region
ends after a control instruction (BRA, EXIT, BAR, CALL, RET, BSYNC, ...) and before any
instruction that is a jump target (a branch/call/BSSY address, or a `.L_x_N:` label in
nvdisasm output). Walking a region in program order, a global load (LDG, LDGSTS = cp.async,
UTMALDG / UBLKCP = TMA) is in flight from its issue until the first instruction that names
one of its destination registers (a read, or an overwrite, which waits just as long); cp.async
and TMA copies have no destination register and stay in flight until DEPBAR / SYNCS. At every
such first use, and at the region end, the loads still in flight are counted; the kernel
reports the largest count and the largest sum of their widths (U8/S8 1 B, U16/S16 2 B, default
4 B, .64 8 B, .128 16 B; TMA copies count 0 B: their size is in the tensor map). For a region
that issues its loads before any use this is exactly "the loads issued before the first use".
Generic loads (LD.E: the compiler could not prove the address space; through a pointer into
shared memory they are shared-memory reads) are counted apart; the JSON has a second MLP figure
that counts them as global loads, and a histogram of the per-region figure. The analysis is static:
it ignores predication and the scoreboards' grouping of loads, so it is an upper bound on what
one thread overlaps, and a count of 1-2 is a reliable sign of a latency-bound loop.

Occupancy uses the per-SM limits of the architecture (sm_90: 64 K registers allocated per warp in
units of 256, 2048 threads, 32 blocks, 228 KB shared memory with 1 KB reserved per block) and the
threads per block and dynamic shared memory of each kernel's MMFAST_LAUNCH site in the CUDA
headers (launch_sites; the kernel's __launch_bounds__ for a kernel launched elsewhere).

The analysis functions take SASS / ptxas text and return numbers (tests/test_sass_report.py).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The build compiles the linear-attention kernels in two units (csrc/cuda/linear_attention_passes.h);
# the report compiles all of them in one, written into the work folder.
DEFAULT_HEADER = "mmfast/cuda/linear_attention.cuh"

# ---- launch configuration, read off the source ---------------------------------------------
# Threads per block and dynamic shared memory of each kernel come from its MMFAST_LAUNCH site
# (MMFAST_LAUNCH(kernel<T>, grid, threads, smem, stream, args...)) in the CUDA headers; named
# constants (kThreads) are resolved from their `constexpr int NAME = VALUE;`.
CUDA_HEADERS = "csrc/include/mmfast/cuda"
_CONSTANT_RE = re.compile(r"constexpr\s+(?:int|int64_t|size_t)\s+(\w+)\s*=\s*(\d+)\s*;")


@dataclass(frozen=True)
class Launch:
    threads: int
    dynamic_smem: int
    site: str  # file:line of the MMFAST_LAUNCH


def split_top_level(text: str, brackets: str = "([{", closers: str = ")]}") -> tuple[list[str], int]:
    """The comma-separated top-level arguments at the start of text, up to the first unmatched
    closer (or the end), and where they end. brackets / closers: what nests."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in brackets:
            depth += 1
        elif ch in closers:
            if depth == 0:
                args.append(text[start:i].strip())
                return [a for a in args if a], i
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    args.append(text[start:].strip())
    return [a for a in args if a], len(text)


def _kernel_name(text: str) -> tuple[str, str]:
    """The kernel's name at the start of text and text from just after its template arguments
    (their commas are not argument separators). A kernel in parentheses, as
    `MMFAST_LAUNCH((kernel<C, true>), ...)` needs for the preprocessor, counts as the kernel."""
    match = re.match(r"\s*(\(\s*)?(\w+)\s*", text)
    if match is None:
        return "", text
    end, depth = match.end(), 0
    if text[end:end + 1] == "<":
        for i in range(end, len(text)):
            depth += {"<": 1, ">": -1}.get(text[i], 0)
            if depth == 0:
                end = i + 1
                break
    if match.group(1):
        close = re.match(r"\s*\)", text[end:])
        end += close.end() if close else 0
    return match.group(2), "_" + text[end:]  # "_": a placeholder for the kernel argument


def launch_sites_in(text: str, path: str, constants: dict[str, int]) -> dict[str, Launch]:
    """kernel name -> Launch for every MMFAST_LAUNCH in one source text."""
    sites = {}
    for match in re.finditer(r"MMFAST_LAUNCH\(", text):
        kernel, rest = _kernel_name(text[match.end():])
        args, _ = split_top_level(rest)
        if not kernel or len(args) < 4:
            continue
        value = lambda arg: int(arg) if arg.isdigit() else constants.get(arg, 0)  # noqa: E731
        line = text.count("\n", 0, match.start()) + 1
        sites[kernel] = Launch(value(args[2]), value(args[3]), f"{path}:{line}")
    return sites


def launch_sites(root: Path = ROOT) -> dict[str, Launch]:
    """Every MMFAST_LAUNCH under csrc/include/mmfast/cuda, with named constants resolved."""
    texts = {str(p.relative_to(root)): p.read_text() for p in sorted((root / CUDA_HEADERS).rglob("*.cuh"))}
    constants = {name: int(v) for text in texts.values() for name, v in _CONSTANT_RE.findall(text)}
    sites = {}
    for path, text in texts.items():
        sites.update(launch_sites_in(text, path, constants))
    return sites


# ---- SASS parsing --------------------------------------------------------------------------
_INSTR_RE = re.compile(r"^\s*/\*(?P<addr>[0-9a-fA-F]+)\*/\s+(?P<pred>@!?U?P(?:T|\d)\s+)?"
                       r"(?P<op>[A-Z][A-Z0-9_.]*)(?P<args>[^;]*);")
_LABEL_RE = re.compile(r"^\s*(\.L\w*):")
_FUNCTION_RE = re.compile(r"^\s*(?:Function\s*:\s*(?P<cuobjdump>\S+)|\.text\.(?P<nvdisasm>\S+):)")
_HEX_RE = re.compile(r"\b0x([0-9a-fA-F]+)\b")
_REG_RE = re.compile(r"(?<![\w.])R(\d+)(\.64)?")

CONTROL = {"BRA", "BRX", "BRXU", "JMP", "JMX", "JMXU", "CALL", "RET", "EXIT", "BAR", "BSYNC", "BREAK",
           "BPT", "KILL", "RTT"}
TARGETED = {"BRA", "JMP", "CALL", "BSSY", "SSY", "PBK", "PCNT"}  # operands hold a code address
MMA = {"HMMA", "IMMA", "DMMA", "BMMA", "HGMMA", "IGMMA", "QGMMA", "BGMMA"}
LOAD_KINDS = {"LDG": "global", "LDGSTS": "async", "UTMALDG": "tma", "UBLKCP": "tma", "LD": "generic"}
GLOBAL_KINDS = frozenset({"global", "async", "tma"})
RETIRED_BY = {"async": {"DEPBAR", "SYNCS"}, "tma": {"SYNCS"}}  # copies without destination regs
_WIDTHS = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16, "256": 32}


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str
    args: str

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]


@dataclass
class Function:
    instrs: list[Instr] = field(default_factory=list)
    targets: set[int] = field(default_factory=set)  # addresses that start a region


def parse_sass(text: str) -> dict[str, Function]:
    """Mangled name -> instructions and jump targets, from cuobjdump -sass or nvdisasm text.
    Text without a function header (a snippet) becomes the function ''."""
    functions: dict[str, Function] = {}
    current, label_pending = None, False
    for line in text.splitlines():
        header = _FUNCTION_RE.match(line)
        if header:
            current = functions.setdefault(header.group("cuobjdump") or header.group("nvdisasm"), Function())
            continue
        if _LABEL_RE.match(line):
            label_pending = True
            continue
        match = _INSTR_RE.match(line)
        if not match:
            continue
        if current is None:
            current = functions.setdefault("", Function())
        instr = Instr(int(match["addr"], 16), match["op"], match["args"].strip())
        current.instrs.append(instr)
        if label_pending:
            current.targets.add(instr.addr)
            label_pending = False
        if instr.base in TARGETED:
            current.targets.update(int(h, 16) for h in _HEX_RE.findall(instr.args))
    return functions


def split_regions(function: Function) -> list[list[Instr]]:
    """Straight-line regions: cut before every jump target and after every control instruction."""
    regions: list[list[Instr]] = []
    current: list[Instr] = []
    for instr in function.instrs:
        if instr.addr in function.targets and current:
            regions.append(current)
            current = []
        current.append(instr)
        if instr.base in CONTROL:
            regions.append(current)
            current = []
    if current:
        regions.append(current)
    return regions


# ---- registers and loads -------------------------------------------------------------------
def access_bytes(opcode: str) -> int:
    """Bytes one thread moves: from the width suffix, 4 when there is none."""
    widths = [_WIDTHS[token] for token in opcode.split(".")[1:] if token in _WIDTHS]
    return widths[-1] if widths else 4


def _operand_span(opcode: str) -> int:
    """Registers one register operand (outside the address) covers, conservatively."""
    base = opcode.split(".", 1)[0]
    if base in MMA:
        return 4  # fragments span several registers; 4 may over-count, i.e. see a use early
    if base.startswith(("LD", "ST", "ATOM", "RED")):
        return max(1, access_bytes(opcode) // 4)
    if base in {"DADD", "DFMA", "DMUL", "DSETP", "DMNMX"} or "F64" in opcode.split("."):
        return 2
    return 1


def registers_named(instr: Instr) -> set[int]:
    """General registers the instruction reads or writes (R0..R254; RZ excluded)."""
    regs: set[int] = set()
    span = _operand_span(instr.opcode)
    for match in _REG_RE.finditer(instr.args):
        in_address = instr.args.count("[", 0, match.start()) > instr.args.count("]", 0, match.start())
        width = 2 if match.group(2) else (1 if in_address else span)
        first = int(match.group(1))
        regs.update(range(first, first + width))
    return regs


@dataclass(frozen=True)
class Load:
    kind: str  # global | async | tma | generic
    nbytes: int
    dest: frozenset  # destination registers (empty for cp.async / TMA)


def as_load(instr: Instr) -> Load | None:
    kind = LOAD_KINDS.get(instr.base)
    if kind is None:
        return None
    nbytes = 0 if kind == "tma" else access_bytes(instr.opcode)
    dest: frozenset = frozenset()
    first = _REG_RE.match(instr.args)
    if kind in ("global", "generic") and first:
        start = int(first.group(1))
        dest = frozenset(range(start, start + max(1, nbytes // 4)))
    return Load(kind, nbytes, dest)


def _retired(instr: Instr, in_flight: list[Load]) -> list[Load]:
    named = registers_named(instr)
    return [load for load in in_flight if load.dest & named or instr.base in RETIRED_BY.get(load.kind, ())]


def region_mlp(region: list[Instr], kinds=GLOBAL_KINDS) -> tuple[int, int]:
    """(most loads, most bytes) of `kinds` in flight at a first use or at the region end."""
    in_flight: list[Load] = []
    most_loads = most_bytes = 0
    for instr in region + [None]:  # None: the region end
        done = in_flight if instr is None else _retired(instr, in_flight)
        if done:
            most_loads = max(most_loads, len(in_flight))
            most_bytes = max(most_bytes, sum(load.nbytes for load in in_flight))
            in_flight = [load for load in in_flight if load not in done]
        load = as_load(instr) if instr is not None else None
        if load is not None and load.kind in kinds:
            in_flight.append(load)
    return most_loads, most_bytes


def function_mlp(function: Function, kinds=GLOBAL_KINDS) -> tuple[int, int]:
    results = [region_mlp(region, kinds) for region in split_regions(function)]
    return max((r[0] for r in results), default=0), max((r[1] for r in results), default=0)


def mlp_histogram(function: Function) -> dict[int, int]:
    """How many regions reach each load MLP (regions without global loads left out)."""
    counts: dict[int, int] = {}
    for region in split_regions(function):
        loads = region_mlp(region)[0]
        if loads:
            counts[loads] = counts.get(loads, 0) + 1
    return dict(sorted(counts.items()))


def async_pipeline(function: Function) -> tuple[int, int, int]:
    """(groups a wait leaves pending, copies per group, bytes per group) of a kernel's cp.async
    ring: LDGDEPBAR (commit_group) closes a group of LDGSTS, DEPBAR.LE SB0, N (wait_group N)
    waits until at most N groups are pending. In a multi-stage pipeline N groups stay in flight
    while the thread computes on the one it waited for: N x the group is what it overlaps, which
    the region metric (loads issued before a use) cannot see. Largest group and N in the code
    (program order); (0, 0, 0) without cp.async."""
    pending = group_copies = group_bytes = copies = nbytes = 0
    for instr in function.instrs:
        if instr.base == "LDGSTS":
            copies += 1
            nbytes += access_bytes(instr.opcode)
        elif instr.base == "LDGDEPBAR":
            group_copies, group_bytes = max(group_copies, copies), max(group_bytes, nbytes)
            copies = nbytes = 0
        elif instr.base == "DEPBAR":
            match = re.search(r"SB0,\s*(0x[0-9a-fA-F]+|\d+)", instr.args)
            if match:
                pending = max(pending, int(match.group(1), 0))
    return (pending, group_copies, group_bytes) if group_copies else (0, 0, 0)


_TARGET_RE = re.compile(r"\b0x([0-9a-fA-F]+)\b")


def back_edges(function: Function) -> set[tuple[int, int]]:
    """(head, tail) of every backward BRA: the branch at `tail` jumps back to `head`."""
    spans = set()
    for instr in function.instrs:
        match = _TARGET_RE.search(instr.args) if instr.base == "BRA" else None
        if match and int(match.group(1), 16) <= instr.addr:
            spans.add((int(match.group(1), 16), instr.addr))
    return spans


def ring_loops(function: Function) -> list[int]:
    """Static instruction counts of the loops around the cp.async ring's first wait
    (DEPBAR.LE), innermost first, each counting its own instructions only (those of the loops
    inside it excluded). The innermost is the per-slice body of a streaming kernel; the next
    is what runs once per group of slices (a flush of the sums, an item's epilogue). Counts
    include paths an iteration may skip (the next item's setup, the backward-only scalars) and
    count an inner loop once; [] without a ring. A loop level is the span of a backward branch
    around the wait: two back edges to one head count as one level only if their spans agree,
    and a peeled first iteration that holds the first wait would shift the levels (the SASS
    of the ring kernels has neither today)."""
    waits = [i.addr for i in function.instrs if i.base == "DEPBAR" and "SB0" in i.args]
    if not waits:
        return []
    spans = {(head, tail) for head, tail in back_edges(function) if head <= waits[0] <= tail}
    counts, inside = [], 0
    for start, end in sorted(spans, key=lambda span: span[1] - span[0]):
        total = sum(start <= i.addr <= end for i in function.instrs)
        counts.append(total - inside)
        inside = total
    return counts


def ring_loop_instructions(function: Function) -> int:
    """Instructions (static) of the innermost loop around the ring's wait: one slice per warp."""
    loops = ring_loops(function)
    return loops[0] if loops else 0


@dataclass
class Loop:
    head: int   # address of the loop's first instruction (the back edge's target)
    tail: int   # address of the back edge
    depth: int  # 0: outermost
    total: int  # static instructions between head and tail
    own: dict   # instruction classes of the loop's own instructions (nested loops excluded)


LOOP_CLASSES = {  # class -> opcode bases; everything else counts as "other"
    "global": {"LDG", "LDGSTS", "STG", "UTMALDG", "UBLKCP"}, "shared": {"LDS", "STS", "LDSM"},
    "mma": MMA, "barrier": {"BAR"},
    "integer": {"IMAD", "IADD3", "IADD", "VIADD", "LEA", "SHF", "LOP3", "ISETP", "SEL", "IMNMX", "VIMNMX", "PRMT",
                "IABS", "FLO", "POPC", "I2F", "F2I", "MOV", "UMOV", "IMUL"},
    "float": {"FADD", "FMUL", "FFMA", "FSETP", "FSEL", "FMNMX", "DADD", "DMUL", "DFMA", "F2F", "MUFU", "HADD2",
              "HFMA2", "HMUL2"},
}


def loops_of(function: Function) -> list[Loop]:
    """Every loop (span of a backward BRA; two back edges to one head with different tails are
    two loops), outermost first, with the classes of its own static instructions. Static counts:
    how often an inner loop runs per outer iteration is not in the code."""
    spans = sorted(back_edges(function), key=lambda span: (span[0], -span[1]))
    loops = []
    for head, tail in spans:
        inner = [(h, t) for h, t in spans if (h, t) != (head, tail) and head <= h and t <= tail]
        depth = sum(1 for h, t in spans if (h, t) != (head, tail) and h <= head and tail <= t)
        own = {name: 0 for name in list(LOOP_CLASSES) + ["other"]}
        total = 0
        for instr in function.instrs:
            if not head <= instr.addr <= tail:
                continue
            total += 1
            if any(h <= instr.addr <= t for h, t in inner):
                continue
            own[next((name for name, bases in LOOP_CLASSES.items() if instr.base in bases), "other")] += 1
        loops.append(Loop(head, tail, depth, total, own))
    return loops


def loops_table(name: str, loops: list[Loop]) -> str:
    """Markdown: one row per loop of one kernel, nested loops indented."""
    classes = list(LOOP_CLASSES) + ["other"]
    out = [f"### loops of {name}", "", "| loop | static instr | own instr | " + " | ".join(classes) + " |",
           "|---|---|---|" + "---|" * len(classes)]
    for loop in loops:
        label = "&nbsp;&nbsp;" * loop.depth + f"{loop.head:#x}-{loop.tail:#x}"
        out.append(f"| {label} | {loop.total} | {sum(loop.own.values())} | "
                   + " | ".join(str(loop.own[c]) for c in classes) + " |")
    return "\n".join(out)


@dataclass
class SassStats:
    global_loads: int = 0  # LDG + LDGSTS + TMA
    loads_16b: int = 0
    generic_loads: int = 0  # LD (generic address space)
    async_copies: int = 0  # LDGSTS
    tma_copies: int = 0
    mlp_loads: int = 0
    mlp_bytes: int = 0
    mlp_loads_with_generic: int = 0
    mlp_bytes_with_generic: int = 0
    async_pending_groups: int = 0  # N of the cp.async ring's wait_group N
    async_group_copies: int = 0    # LDGSTS per commit group
    async_group_bytes: int = 0
    pipelined_loads: int = 0       # N x copies per group: cp.async copies in flight while computing
    pipelined_bytes: int = 0
    ring_loop_instructions: int = 0  # static instructions of the loop around the ring's wait
    ring_outer_instructions: int = 0  # the enclosing loop's own (once per group of slices)
    stg: int = 0
    st_generic: int = 0
    lds: int = 0
    sts: int = 0
    ldsm: int = 0
    mma: int = 0
    bar: int = 0
    instructions: int = 0
    shared_window: bool = False  # reads SR_SWINHI: generic pointers into shared memory
    mlp_histogram: dict = field(default_factory=dict)  # loads in flight -> regions (regions with loads)


_COUNTED = {"STG": "stg", "ST": "st_generic", "LDS": "lds", "STS": "sts", "LDSM": "ldsm", "BAR": "bar"}


def _count_instr(stats: SassStats, instr: Instr) -> None:
    stats.instructions += 1
    stats.shared_window |= "SR_SWINHI" in instr.args
    load = as_load(instr)
    if load is not None and load.kind == "generic":
        stats.generic_loads += 1
    elif load is not None:
        stats.global_loads += 1
        stats.loads_16b += load.nbytes == 16
        stats.async_copies += load.kind == "async"
        stats.tma_copies += load.kind == "tma"
    counter = "mma" if instr.base in MMA else _COUNTED.get(instr.base)
    if counter:
        setattr(stats, counter, getattr(stats, counter) + 1)


def analyze_function(function: Function) -> SassStats:
    stats = SassStats()
    for instr in function.instrs:
        _count_instr(stats, instr)
    stats.mlp_loads, stats.mlp_bytes = function_mlp(function)
    with_generic = GLOBAL_KINDS | {"generic"}
    stats.mlp_loads_with_generic, stats.mlp_bytes_with_generic = function_mlp(function, with_generic)
    stats.mlp_histogram = mlp_histogram(function)
    stats.async_pending_groups, stats.async_group_copies, stats.async_group_bytes = async_pipeline(function)
    stats.pipelined_loads = stats.async_pending_groups * stats.async_group_copies
    stats.pipelined_bytes = stats.async_pending_groups * stats.async_group_bytes
    loops = ring_loops(function)
    stats.ring_loop_instructions = loops[0] if loops else 0
    stats.ring_outer_instructions = loops[1] if len(loops) > 1 else 0
    return stats


# ---- ptxas -v and cuobjdump -elf -----------------------------------------------------------
@dataclass
class Resources:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0  # static shared memory, bytes
    barriers: int = 0


_PTXAS_FUNC_RE = re.compile(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?")
_PTXAS_FIELDS = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "barriers": re.compile(r"used (\d+) barriers"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(text: str) -> dict[str, Resources]:
    """Mangled entry name -> resources, from nvcc -Xptxas -v output."""
    result: dict[str, Resources] = {}
    current = None
    for line in text.splitlines():
        header = _PTXAS_FUNC_RE.search(line)
        if header:
            current = result.setdefault(header.group(1), Resources())
            continue
        if current is None:
            continue
        for name, pattern in _PTXAS_FIELDS.items():
            found = pattern.search(line)
            if found:
                setattr(current, name, int(found.group(1)))
    return result


# ptxas' "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to
# <reason> in the function '<mangled>'": the warpgroup MMAs then run one at a time (no overlap).
_WGMMA_SERIALIZED_RE = re.compile(r"wgmma\.mma_async instructions are serialized\s*(?P<why>.*?)\s*"
                                  r"(?:in the function '?(?P<function>[\w$.]+)'?)?\s*$")


def parse_wgmma_serialization(text: str) -> dict[str, str]:
    """Mangled entry name -> ptxas' reason, for every kernel whose wgmma instructions ptxas
    serialized (a performance loss it reports only as an info line)."""
    result = {}
    for line in text.splitlines():
        found = _WGMMA_SERIALIZED_RE.search(line)
        if found:
            result[found.group("function") or "?"] = found.group("why") or "no reason given"
    return result


def parse_max_threads(elf_text: str) -> dict[str, int]:
    """Mangled name -> __launch_bounds__ threads (EIATTR_MAX_THREADS), from cuobjdump -elf."""
    result, current, in_attr = {}, None, False
    for line in elf_text.splitlines():
        if line.startswith(".nv.info."):
            current = line[len(".nv.info."):].strip()
        elif "Attribute:" in line:
            in_attr = "EIATTR_MAX_THREADS" in line
        elif in_attr and current and line.strip().startswith("Value:"):
            dims = [int(v, 16) for v in _HEX_RE.findall(line)]
            result[current] = dims[0] * dims[1] * dims[2] if len(dims) == 3 else 0
            in_attr = False
    return result


# ---- names ---------------------------------------------------------------------------------
_DTYPES = {"float": "f32", "double": "f64", "__half": "f16", "__nv_bfloat16": "bf16", "c10::Half": "f16",
           "c10::BFloat16": "bf16", "signed char": "i8", "unsigned char": "u8", "int": "i32", "long": "i64"}


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled, with libstdc++'s __cxa_demangle, else c++filt / cu++filt, else as is."""
    result = {name: _cxa_demangle(name) for name in names}
    missing = [name for name, value in result.items() if value is None]
    if missing:
        result.update(_filt_demangle(missing))
    return {name: value or name for name, value in result.items()}


@functools.lru_cache(maxsize=None)
def _libstdcxx():
    try:
        return ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6")
    except OSError:
        return None


def _cxa_demangle(name: str) -> str | None:
    lib = _libstdcxx()
    if lib is None:
        return None
    fn = lib.__cxa_demangle
    fn.restype = ctypes.c_void_p
    status = ctypes.c_int()
    ptr = fn(name.encode(), None, None, ctypes.byref(status))
    if status.value != 0 or not ptr:
        return None
    text = ctypes.string_at(ptr).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(ptr))
    return text


def _filt_demangle(names: list[str]) -> dict[str, str | None]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return {}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {}


def _template_args(text: str) -> list[str]:
    """Top-level arguments of a template argument list (without its angle brackets)."""
    return split_top_level(text, brackets="<(", closers=">)")[0]


def _short_template_arg(arg: str) -> str:
    arg = arg.strip()
    nested = re.fullmatch(r"[\w:]+<(.*)>", arg)  # a configuration struct: its arguments
    if nested:
        return ", ".join(_short_template_arg(a) for a in _template_args(nested.group(1)))
    enum = re.fullmatch(r"\(([\w:]+)\)(-?\d+)", arg)  # (mmfast::FeatureMap)1
    if enum:
        return f"{enum.group(1).rsplit('::', 1)[-1]}={enum.group(2)}"
    return _DTYPES.get(arg, re.sub(r"\b\w+::", "", arg))


def short_name(demangled: str) -> tuple[str, str]:
    """'void ns::la_apply_kernel<__half>(ns::ApplyArgs)' -> ('la_apply_kernel', 'f16')."""
    text = re.sub(r"^void\s+", "", demangled)
    depth, cut = 0, len(text)
    for i, ch in enumerate(text):  # drop the parameter list: the first '(' at template depth 0
        depth += 1 if ch == "<" else -1 if ch == ">" else 0
        if ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    text = text[:cut]
    head, _, targs = text.partition("<")
    name = head.rsplit("::", 1)[-1]
    args = _template_args(targs[:-1]) if targs.endswith(">") else []
    return name, ", ".join(_short_template_arg(a) for a in args)


# ---- occupancy -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits (CUDA C++ Programming Guide, compute capabilities table; cuda_occupancy.h)."""
    regs_per_sm: int = 65536
    max_threads: int = 2048
    max_blocks: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024
    reserved_smem_per_block: int = 1024  # cudaDevAttrReservedSharedMemoryPerBlock
    smem_unit: int = 128
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    subpartitions: int = 4  # the register file is split between the 4 schedulers


SM_LIMITS = {
    "sm_80": SmLimits(smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_86": SmLimits(max_threads=1536, max_blocks=16, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    "sm_89": SmLimits(max_threads=1536, max_blocks=24, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    "sm_90": SmLimits(),
}


@dataclass
class Occupancy:
    blocks_per_sm: int
    occupancy: float  # resident warps / max warps
    limited_by: str


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, smem: int, threads: int, limits: SmLimits = SmLimits()) -> Occupancy:
    """Resident blocks per SM the way cudaOccupancyMaxActiveBlocksPerMultiprocessor counts them."""
    warps = -(-threads // 32)
    max_warps = limits.max_threads // 32
    per_warp = _round_up(max(registers, 1) * 32, limits.reg_unit)
    # Each warp's registers come from one scheduler's quarter of the register file; the per-block
    # check counts warps rounded up to the number of schedulers.
    warps_by_regs = (limits.regs_per_sm // limits.subpartitions // per_warp) * limits.subpartitions
    block_regs = per_warp * _round_up(warps, limits.subpartitions)
    fits = registers <= limits.max_regs_per_thread and block_regs <= limits.regs_per_sm
    block_smem = _round_up(smem, limits.smem_unit) + limits.reserved_smem_per_block
    candidates = {
        "blocks": limits.max_blocks,
        "threads": max_warps // warps,
        "registers": warps_by_regs // warps if fits else 0,
        "smem": 0 if smem > limits.smem_per_block else limits.smem_per_sm // block_smem,
    }
    blocks = min(candidates.values())
    limiter = "+".join(name for name, value in candidates.items() if value == blocks)
    return Occupancy(blocks, blocks * warps / max_warps, limiter)


# ---- toolchain -----------------------------------------------------------------------------
def _load_setup_module():
    """setup.py as a module (its setup() call is guarded by __main__): the build's own toolkit lookup."""
    spec = importlib.util.spec_from_file_location("_mmfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuda_home() -> str | None:
    """The CUDA toolkit root exactly as setup.py finds it (CUDA_HOME / CUDA_PATH, else the real
    root of the nvcc on PATH)."""
    return _load_setup_module().find_cuda_home()


def nvidia_wheel_dirs(sub: str, marker: str) -> list[str]:
    """nvidia/<pkg>/<sub> folders of the pip nvidia-* wheels holding `marker` (setup.py's lookup)."""
    dirs = []
    for entry in sys.path:
        for pattern in (f"nvidia/cu*/{sub}", f"nvidia/*/{sub}"):
            dirs += [d for d in glob.glob(os.path.join(entry, pattern)) if os.path.exists(os.path.join(d, marker))]
    return sorted(set(dirs))


def triton_bin_dir() -> str | None:
    """The bin/ of Triton's NVIDIA backend (it ships ptxas, cuobjdump and nvdisasm), found
    without importing triton."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "backends", "nvidia", "bin")


def find_tool(name: str, cuda_home: str | None, near: str | None = None) -> str | None:
    """`name` next to `near`, on PATH, in $CUDA_HOME/bin, in a pip nvidia-* wheel's bin/ or in
    Triton's NVIDIA backend."""
    candidates = [os.path.join(os.path.dirname(near), name) if near else None, shutil.which(name)]
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / name))
    candidates += [os.path.join(d, name) for d in nvidia_wheel_dirs("bin", name)]
    triton_bin = triton_bin_dir()
    if triton_bin:
        candidates.append(os.path.join(triton_bin, name))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def torch_nvcc_flags() -> list[str]:
    """Includes and flags torch's BuildExtension gives nvcc for setup.py's mmfast._C (Linux)."""
    import inspect
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("sass_report: needs torch for the build flags; run it with the project's venv (.venv/bin/python)")

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    std = re.findall(r"'(c\+\+\d\d)'", inspect.getsource(cpp_extension.BuildExtension.build_extensions))
    flags = list(cpp_extension.COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC",
                                                     "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                                                     f"-std={std[0] if std else 'c++17'}"]
    if hasattr(cpp_extension.BuildExtension, "_add_gnu_cpp_abi_flag"):  # older torch
        flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    return flags + [f"-I{d}" for d in includes]


def nvcc_command(cuda_home: str, source: Path, cubin: Path, arch: str) -> list[str]:
    number = arch.removeprefix("sm_")
    includes = [ROOT / "csrc" / "include", ROOT / "csrc"] + nvidia_wheel_dirs("include", "cublas_v2.h")
    return ([str(Path(cuda_home) / "bin" / "nvcc"), "-cubin", "-O3", "-lineinfo", "-Xptxas", "-v",
             "-gencode", f"arch=compute_{number},code=sm_{number}"]
            + [f"-I{d}" for d in includes] + torch_nvcc_flags() + ["-o", str(cubin), str(source)])


def _run(cmd: list[str], what: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        sys.exit(f"sass_report: {what} failed (exit {result.returncode}):\n{tail}\ncommand: {' '.join(cmd)}")
    return result


# ---- report --------------------------------------------------------------------------------
_DTYPE_ORDER = {"f32": 0, "f16": 1, "bf16": 2, "f64": 3}


# Dynamic shared memory the source computes (the sizeof of a shared-memory struct, a function of
# the tile width or the head dim) instead of writing it as a number at the MMFAST_LAUNCH site:
# evaluated by a host-only probe that nvcc compiles against the same headers and this machine
# runs (no GPU needed). Both depend on the tile width W (the last template argument); the apply
# kernel's also grows with Dk: the probe takes Dk = W.
# A key "kernel<suffix>" applies to the instantiations whose template arguments end with suffix.
TILE_WIDTHS = (48, 64, 80)  # la::tile_width's choices
_APPLY_SMEM = "mmfast::cuda::la::async_apply_smem_bytes<mmfast::cuda::la::Config<__nv_bfloat16, " \
              "mmfast::FeatureMap::kElu1, true>, {w}>({w})"
DYNAMIC_SMEM_PROBES = {  # apply: Dk = W, the head dim each width is chosen for (40 -> 48: 48 rows)
    **{f"la_state_async_kernel<{w}>": f"mmfast::cuda::la::kAsyncStateSmem<{w}>" for w in TILE_WIDTHS},
    **{f"la_apply_async_kernel<{w}>": _APPLY_SMEM.format(w=w) for w in TILE_WIDTHS},
    # The backward's tile kernel (backward_async.cuh): each pass (0 apply, 1 state, 2 apply with
    # the fused dS / dm sums), tile width and ring depth it instantiates.
    **{f"la_backward_async_kernel<BackwardPass={p}, {dp}, {st}>":
       f"mmfast::cuda::la::kPairSmem<__half, {dp}, {st}, {'true' if p == 2 else 'false'}>"
       for p, dp, st in [(p, dp, st) for p in (0, 1) for dp, st in ((64, 3), (64, 2), (80, 2), (128, 2), (160, 2))]
       + [(2, 64, 3)]},
    # The VQ search's NT tile GEMM ring (tile_gemm.cuh, included by the default header): fp16 and
    # bf16 stages have the same size.
    "vq_search_async_kernel<NtMmaSync>": "mmfast::cuda::kNtSmemBytes<__half>",
    "vq_search_async_kernel<NtWgmma>": "mmfast::cuda::kNtWgSmemBytes<__half>",
    # The packed masked conv streams through the same ring (either multiplier's).
    "masked_conv_async_kernel<NtMmaSync>": "mmfast::cuda::kNtSmemBytes<__half>",
    "masked_conv_async_kernel<NtWgmma>": "mmfast::cuda::kNtWgSmemBytes<__half>",
}


def probed_smem(dynamic_smem: dict[str, int], kernel: str, template_args: str) -> int | None:
    """The probe's bytes for one instantiation: a `kernel<suffix>` key whose suffix ends its
    template arguments, else a plain `kernel` key, else None."""
    for key, value in dynamic_smem.items():
        if key.startswith(kernel + "<") and key.endswith(">") and template_args.endswith(key[len(kernel) + 1:-1]):
            return value
    return dynamic_smem.get(kernel)


def probe_source(probes: dict[str, str] = DYNAMIC_SMEM_PROBES) -> str:
    """A host program that prints `kernel bytes` for every probe."""
    lines = [f'#include "{DEFAULT_HEADER}"', "#include <cstdio>", "int main() {"]
    lines += [f'  std::printf("{name} %zu\\n", static_cast<size_t>({expr}));' for name, expr in probes.items()]
    return "\n".join(lines + ["  return 0;", "}"]) + "\n"


def probe_dynamic_smem(cuda_home: str, workdir: Path) -> dict[str, int]:
    """kernel name -> dynamic shared memory bytes, from compiling and running probe_source()."""
    source, exe = workdir / "smem_probe.cu", workdir / "smem_probe"
    source.write_text(probe_source())
    _run([str(Path(cuda_home) / "bin" / "nvcc"), "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", "-o", str(exe),
          str(source)], "nvcc (shared-memory probe)")
    out = _run([str(exe)], "the shared-memory probe").stdout
    return {name: int(value) for name, value in (line.rsplit(None, 1) for line in out.splitlines() if line.strip())}


def _launch_from_bounds(max_threads: int) -> Launch:
    """A kernel with no MMFAST_LAUNCH site: assume it is launched with its __launch_bounds__ threads."""
    return Launch(max_threads, 0, "__launch_bounds__" if max_threads else "?")


def kernel_rows(sass: str, ptxas: str, elf: str, arch: str, dynamic_smem: dict[str, int] | None = None) -> list[dict]:
    """One row per kernel instantiation: names, resources, launch, occupancy, SASS stats.
    dynamic_smem: kernel -> bytes computed by the source (probe_dynamic_smem), replacing the site's."""
    functions = parse_sass(sass)
    resources = parse_ptxas(ptxas)
    serialized = parse_wgmma_serialization(ptxas)
    bounds = parse_max_threads(elf)
    names = demangle(list(functions))
    limits = SM_LIMITS.get(re.sub(r"[a-z]$", "", arch))
    launches = launch_sites()
    rows = []
    for mangled, function in functions.items():
        kernel, targs = short_name(names[mangled])
        res = resources.get(mangled, Resources())
        launch = launches.get(kernel) or _launch_from_bounds(bounds.get(mangled, 0))
        probed = probed_smem(dynamic_smem or {}, kernel, targs)
        if probed is not None:
            launch = Launch(launch.threads, probed, f"{launch.site}, size from the probe")
        row = {"kernel": kernel, "template_args": targs, "mangled": mangled, **asdict(res),
               "threads": launch.threads, "dynamic_smem": launch.dynamic_smem, "launch_site": launch.site,
               "launch_bounds": bounds.get(mangled, 0), "wgmma_serialized": serialized.get(mangled, ""),
               **asdict(analyze_function(function))}
        if limits and launch.threads:
            row.update(asdict(occupancy(res.registers, res.smem + launch.dynamic_smem, launch.threads, limits)))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel"], _DTYPE_ORDER.get(r["template_args"].split(",")[0], 9),
                                       r["template_args"]))


COLUMNS = [  # header, row -> cell
    ("kernel", lambda r: _label(r)),
    ("regs", lambda r: r["registers"]),
    ("spill st/ld B", lambda r: f"{r['spill_stores']}/{r['spill_loads']}"),
    ("stack B", lambda r: r["stack"]),
    ("smem B", lambda r: r["smem"] + r["dynamic_smem"]),
    ("thr/blk", lambda r: r["threads"] or "?"),
    ("blk/SM", lambda r: f"{r['blocks_per_sm']} ({r['limited_by']})" if "blocks_per_sm" in r else "n/a"),
    ("occ", lambda r: f"{r['occupancy']:.0%}" if "occupancy" in r else "n/a"),
    ("g-loads", lambda r: r["global_loads"]),
    ("16B", lambda r: r["loads_16b"]),
    ("LD.E", lambda r: f"{r['generic_loads']}{' (smem)' if r['generic_loads'] and r['shared_window'] else ''}"),
    ("MLP loads", lambda r: r["mlp_loads"]),
    ("MLP B", lambda r: r["mlp_bytes"]),
    ("cp.async B", lambda r: f"{r['pipelined_bytes']} ({r['async_pending_groups']}x{r['async_group_bytes']})"
                             if r["pipelined_bytes"] else 0),
    ("loop instr", lambda r: r["ring_loop_instructions"] or ""),
    ("outer instr", lambda r: r.get("ring_outer_instructions") or ""),
    ("1-load rgns", lambda r: f"{r['mlp_histogram'].get(1, 0)}/{sum(r['mlp_histogram'].values())}"),
    ("STG", lambda r: r["stg"]),
    ("ST.E", lambda r: r["st_generic"]),
    ("LDS", lambda r: r["lds"]),
    ("STS", lambda r: r["sts"]),
    ("LDSM", lambda r: r["ldsm"]),
    ("MMA", lambda r: r["mma"]),
    ("BAR", lambda r: r["bar"]),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


TARGET_LOADS, TARGET_BYTES = 4, 64  # >= 4 independent 16-byte loads per thread before the first use


def meets_mlp_target(row: dict) -> bool:
    """>= 4 loads and >= 64 B in flight per thread: issued before a use, or held in the cp.async ring."""
    return ((row["mlp_loads"] >= TARGET_LOADS and row["mlp_bytes"] >= TARGET_BYTES)
            or (row["pipelined_loads"] >= TARGET_LOADS and row["pipelined_bytes"] >= TARGET_BYTES))


STATIC_SMEM_LIMIT = 48 * 1024  # bytes of __shared__ arrays a kernel may declare (more only dynamically)


def notes(rows: list[dict], arch: str) -> list[str]:
    """Legend, spills, static shared memory over 48 KB, kernels below the load-parallelism target,
    launch configuration."""
    out = ["- MLP loads / MLP B: most global loads (LDG, LDGSTS, TMA) / bytes one thread has in flight before "
           f"it uses one (target >= {TARGET_LOADS} loads, >= {TARGET_BYTES} B); g-loads: LDG + LDGSTS + TMA in "
           "the code, 16B: how many of them are 16 bytes wide; 1-load rgns: regions (with global loads) "
           "that never have more than one load in flight / all regions with global loads",
           "- cp.async B: bytes of cp.async copies one thread keeps in flight while it computes: the N groups "
           "its wait_group N leaves pending x the bytes of one commit group (it counts toward the target too); "
           "loop instr: static instructions of the loop around the ring's wait (one slice per warp; it holds "
           "paths a slice may skip); outer instr: the enclosing loop's own instructions (once per group of "
           "slices: the state pass's flush of its fp32 sums, the apply pass's item epilogue)",
           "- LD.E / ST.E: generic-address loads / stores; '(smem)': the kernel builds generic pointers into "
           "shared memory (reads SR_SWINHI), so they are likely shared-memory accesses, not global ones",
           "- blk/SM: resident blocks per SM and the resource that limits them; occ: resident warps / max warps"]
    out += [f"- spills: {_label(r)} {r['spill_stores']} B stores, {r['spill_loads']} B loads"
            for r in rows if r["spill_stores"] or r["spill_loads"]]
    out += [f"- wgmma serialized by ptxas ({r['wgmma_serialized']}): {_label(r)}"
            for r in rows if r.get("wgmma_serialized")]
    out += [f"- static shared memory over {STATIC_SMEM_LIMIT // 1024} KB: {_label(r)} {r['smem']} B (ptxas refuses it "
            "in a full build: move the excess to dynamic shared memory, MMFAST_DYNAMIC_SHARED + the opt-in)"
            for r in rows if r["smem"] > STATIC_SMEM_LIMIT]
    below = [_label(r) for r in rows if r["global_loads"] and not meets_mlp_target(r)]
    if below:
        out.append(f"- below the MLP target ({len(below)}/{len(rows)}): " + ", ".join(below))
    sites = sorted({f"{r['kernel']}: {r['threads']} threads, {r['dynamic_smem']} B dynamic smem ({r['launch_site']})"
                    for r in rows})
    out += ["- threads per block / dynamic smem and their MMFAST_LAUNCH site:"]
    out += [f"  - {s}" for s in sites]
    if re.sub(r"[a-z]$", "", arch) not in SM_LIMITS:
        out.append(f"- no occupancy limits table for {arch}")
    return out


def _label(row: dict) -> str:
    return f"{row['kernel']}<{row['template_args']}>" if row["template_args"] else row["kernel"]


# ---- main ----------------------------------------------------------------------------------
@dataclass
class Build:
    sass: str
    ptxas: str  # nvcc's -Xptxas -v output
    elf: str
    seconds: float  # the nvcc run
    command: list[str]


def compile_and_dump(source: Path, arch: str, workdir: Path, tools: dict, cuda_home: str) -> Build:
    """nvcc -cubin (timed), then cuobjdump -sass / -elf; the texts also land in workdir."""
    cubin = workdir / (source.stem + f".{arch}.cubin")
    command = nvcc_command(cuda_home, source, cubin, arch)
    (workdir / "nvcc_command.txt").write_text(shlex.join(command) + "\n")
    start = time.perf_counter()
    result = _run(command, "nvcc")
    seconds = time.perf_counter() - start
    ptxas = result.stdout + result.stderr
    (workdir / "ptxas.txt").write_text(ptxas)
    env = {**os.environ, "NVDISASM_PATH": os.path.dirname(tools["nvdisasm"])}  # cuobjdump -sass runs it
    sass = _run([tools["cuobjdump"], "-sass", str(cubin)], "cuobjdump -sass", env).stdout
    (workdir / (cubin.stem + ".sass")).write_text(sass)
    elf = _run([tools["cuobjdump"], "-elf", str(cubin)], "cuobjdump -elf").stdout
    return Build(sass, ptxas, elf, seconds, command)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90a", help="real architecture to compile for (default sm_90a)")
    parser.add_argument("--source", type=Path, help=f"the .cu to compile (default: a unit that includes {DEFAULT_HEADER})")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    parser.add_argument("--keep", type=Path, help="keep the cubin, SASS and ptxas output in this folder")
    parser.add_argument("--cuobjdump", help="cuobjdump binary (default: PATH, $CUDA_HOME/bin, nvidia wheels)")
    parser.add_argument("--loops", metavar="KERNEL",
                        help="also print every loop of the kernels whose name (with template arguments) contains "
                             "KERNEL, e.g. 'masked_conv_kernel<bf16>': static instructions by class")
    return parser.parse_args(argv)


def portable_command(command: list[str], cuda_home: str, workdir: Path) -> list[str]:
    """The nvcc command with this machine's paths replaced ($CUDA_HOME, the repository, <workdir>,
    <site-packages>), so a committed report names no local path."""
    replacements = [(str(workdir), "<workdir>"), (str(Path(cuda_home)), "$CUDA_HOME"), (str(ROOT), ".")]
    replacements += [(p, "<site-packages>") for p in sys.path if p.endswith("site-packages")]
    out = []
    for arg in command:
        for old, new in replacements:
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not re.fullmatch(r"sm_\d+[a-z]?", args.arch):
        sys.exit(f"sass_report: --arch must look like sm_90a, got {args.arch!r}")
    if args.source is not None and not args.source.is_file():
        sys.exit(f"sass_report: no such source file: {args.source}")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        sys.exit("sass_report: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    if args.cuobjdump and not os.access(args.cuobjdump, os.X_OK):
        sys.exit(f"sass_report: --cuobjdump {args.cuobjdump} is not an executable")
    tools = {"cuobjdump": args.cuobjdump or find_tool("cuobjdump", cuda_home)}
    tools["nvdisasm"] = find_tool("nvdisasm", cuda_home, near=tools["cuobjdump"])
    for name, path in tools.items():
        if path is None:
            sys.exit(f"sass_report: {name} not found on PATH, in $CUDA_HOME/bin, in site-packages/nvidia/*/bin or "
                     "in Triton's backend; "
                     f"install it with `pip install nvidia-cuda-{name}`")
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="sass_report_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.source is None:
        args.source = workdir / "linear_attention_kernels.cu"
        args.source.write_text(f'#include "{DEFAULT_HEADER}"  // every kernel: the entry points instantiate them\n')
    try:
        build = compile_and_dump(args.source.resolve(), args.arch, workdir, tools, cuda_home)
        dynamic_smem = probe_dynamic_smem(cuda_home, workdir)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    rows = kernel_rows(build.sass, build.ptxas, build.elf, args.arch, dynamic_smem)
    print(f"compiled {portable_command([str(args.source)], cuda_home, workdir)[0]} for {args.arch} in {build.seconds:.1f} s (nvcc -cubin, {len(rows)} kernels)\n")
    print(markdown_table(rows))
    print("\n" + "\n".join(notes(rows, args.arch)))
    if args.loops:
        functions = parse_sass(build.sass)
        chosen = [r for r in rows if args.loops in _label(r)]
        if not chosen:
            sys.exit(f"sass_report: no kernel matches --loops {args.loops!r}")
        for row in chosen:
            print("\n" + loops_table(_label(row), loops_of(functions[row["mangled"]])))
    if args.json:
        meta = {"source": portable_command([str(args.source)], cuda_home, workdir)[0], "arch": args.arch, "compile_seconds": round(build.seconds, 2),
                "nvcc_command": portable_command(build.command, cuda_home, workdir)}
        args.json.write_text(json.dumps({**meta, "kernels": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
