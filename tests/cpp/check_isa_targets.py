"""Checks that instantiate_isas.h compiled each ISA copy of the CPU kernels for its own ISA.

    python3 check_isa_targets.py OBJECT [OBJECT ...]

Disassembles the objects (objdump) and fails when a function of namespace isa_generic uses
ymm/zmm registers or FMA, one of isa_avx2 uses zmm, or one of isa_generic, isa_avx2 or
isa_avx512 uses AMX tiles or VDPBF16PS, or a function outside the ISA copies (std code,
shared inline helpers: headers included after a `#pragma GCC target`) uses any of them:
such code would crash (SIGILL) on a CPU without the ISA. isa_amx (vq_amx_kernels.cpp) must
hold TDPBF16PS, isa_avx512bf16 (vq_avx512bf16_kernels.cpp) VDPBF16PS. Also fails when the AVX copies use no wide registers at all, which
would mean the `#pragma GCC target` regions stopped applying. Skips when objdump is missing.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

FORBIDDEN = {"isa_generic": ("%ymm", "%zmm", "vfmadd", "%tmm", "vdpbf16ps"), "isa_avx2": ("%zmm", "%tmm", "vdpbf16ps"),
             "isa_avx512": ("%tmm", "vdpbf16ps")}
VEX = re.compile(r"^\s*[0-9a-f]+:\s+(v[a-z0-9]+\s.*%[xyz]mm|vzero(upper|all))")  # vmovups %xmm0, ... (not SSE's movups)
REQUIRED = {"isa_avx2": "%ymm", "isa_avx512": "%zmm", "isa_amx": "tdpbf16ps", "isa_avx512bf16": "vdpbf16ps"}


def scan(path: str, seen: dict) -> list:
    listing = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                             check=True).stdout
    errors, function = [], ""
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        for namespace, words in FORBIDDEN.items():
            if f"::{namespace}::" in function and any(w in line for w in words):
                errors.append(f"{path}: {function}: {line.strip()}")
        # Outside every ISA copy (std code, shared inline helpers such as memory.h's): baseline
        # code, which the linker may pick for every TU, so it must use none of the wide ISAs,
        # nor VEX-encoded SSE (an AVX-only encoding of xmm instructions). isa_generic neither.
        baseline = "isa_" not in function or "::isa_generic::" in function
        if baseline and (any(w in line for w in FORBIDDEN["isa_generic"]) or VEX.search(line)):
            errors.append(f"{path}: {function} (baseline code): {line.strip()}")
        for namespace, word in REQUIRED.items():
            if f"::{namespace}::" in function and word in line:
                seen[namespace] = True
    return errors


def main(paths) -> int:
    if shutil.which("objdump") is None:
        print("objdump not found: ISA target check skipped")
        return 0
    seen, errors = {}, []
    for path in paths:
        errors += scan(path, seen)
    missing = [ns for ns in REQUIRED if ns not in seen]
    for error in errors[:20]:
        print("WRONG ISA:", error)
    for ns in missing:
        print(f"NO WIDE REGISTERS in {ns}: the #pragma GCC target regions did not apply")
    print(f"{len(paths)} objects, {len(errors)} instructions outside their ISA, missing: {missing or 'none'}")
    return 1 if errors or missing else 0


if __name__ == "__main__":
    # CMake passes $<TARGET_OBJECTS:...> as one ';'-separated argument.
    sys.exit(main([path for arg in sys.argv[1:] for path in arg.split(";") if path]))
