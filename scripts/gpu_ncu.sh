#!/usr/bin/env bash
# Nsight Compute counters of mmfast's slowest CUDA kernels, for gpu_lease.sh's ncu phase. Each
# target is a probe that runs its kernels once inside cudaProfilerStart / Stop after a warm-up:
#   la      benchmarks/probes/linear_attention_kernel_split.py --ncu-target: one forward and one
#           backward at bf16, B = 1, N = 262,144, H = 10, D = 64; as built ("la") and with the
#           backward's dS / dm sums unfused ("la-unfused", MMFAST_CUDA_LA_BACKWARD_FUSED=0)
#   decode  benchmarks/probes/decode_ncu_target.py: decode_attention at Liquid-7B, B = 8,
#           T = 4096, and the fused sampler at V = 8192 (issue 9's targets): as built
#           ("decode": on sm_90 the sampler's cluster kernel) and with one block per row
#           ("decode-one-block", MMFAST_CUDA_SAMPLE_CLUSTERS=0)
# Per run, in REPORT_DIR: ncu-<run>.csv (the sections' metrics per kernel launch, ncu --csv
# --page details) and ncu-<run>.log (ncu's messages). Sections: throughput against the peaks
# (SpeedOfLight), launch and occupancy facts, issue slots (SchedulerStats), where warps stall
# (WarpStateStats), memory traffic by level (MemoryWorkloadAnalysis). Clocks are left alone
# (--clock-control none: the device README's rule). Needs a Firecracker machine (ncu reads no
# counters on gVisor).
# Usage: scripts/gpu_ncu.sh REPORT_DIR   (GPU_NCU_TARGETS: default "la decode")
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:?usage: scripts/gpu_ncu.sh REPORT_DIR}
mkdir -p "$REPORT"
# NCU overrides; else ncu on PATH, else next to the toolkit's nvcc (CUDA_HOME/bin, or nvcc on PATH)
find_ncu() {
  command -v ncu && return
  local dir
  for dir in ${CUDA_HOME:+"$CUDA_HOME/bin"} "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/nvcc)")"; do
    [ -x "$dir/ncu" ] && { echo "$dir/ncu"; return; }
  done
}
NCU=${NCU:-$(find_ncu)}
if [ -z "$NCU" ]; then echo "gpu_ncu: ncu not found (PATH, CUDA_HOME/bin, nvcc's folder; set NCU=...)" >&2; exit 2; fi
status=0

# profile RUN [VAR=VALUE ...] -- PROGRAM ARGS...
profile() {
  local run=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  env "${envs[@]}" "$NCU" --clock-control none --profile-from-start off --target-processes all \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
    --log-file "$REPORT/ncu-$run.log" python3 "$@" >"$REPORT/ncu-$run.csv"
  local rc=$?
  [ $rc -eq 0 ] || status=1
  echo "gpu_ncu: $run rc=$rc, $(grep -c '^"' "$REPORT/ncu-$run.csv" 2>/dev/null) CSV rows"
}

for target in ${GPU_NCU_TARGETS:-la decode}; do
  case $target in
    la)
      profile la -- benchmarks/probes/linear_attention_kernel_split.py --ncu-target
      profile la-unfused MMFAST_CUDA_LA_BACKWARD_FUSED=0 -- benchmarks/probes/linear_attention_kernel_split.py --ncu-target ;;
    decode)
      profile decode -- benchmarks/probes/decode_ncu_target.py
      profile decode-one-block MMFAST_CUDA_SAMPLE_CLUSTERS=0 -- benchmarks/probes/decode_ncu_target.py ;;
    *) echo "gpu_ncu: unknown target $target" >&2; status=1 ;;
  esac
done
exit $status
