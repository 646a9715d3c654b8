#!/usr/bin/env bash
# Nsight Compute counters of the linear attention's CUDA kernels, for gpu_lease.sh's ncu phase:
# one forward and one backward of benchmarks/probes/linear_attention_kernel_split.py's first
# shape (bf16, B = 1, N = 262,144, H = 10, D = 64) inside its profiler range, as built and with
# the backward's dS / dm sums unfused (MMFAST_CUDA_LA_BACKWARD_FUSED=0). Per variant:
#   ncu-<variant>.csv  the sections' metrics per kernel launch (ncu --csv --page details)
#   ncu-<variant>.log  ncu's own messages
# Sections: throughput against the peaks (SpeedOfLight), launch and occupancy facts, issue
# slots (SchedulerStats), where warps stall (WarpStateStats), memory traffic by level
# (MemoryWorkloadAnalysis). Clocks are left alone (--clock-control none: the device README's
# rule). Usage: scripts/gpu_ncu.sh REPORT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:?usage: scripts/gpu_ncu.sh REPORT_DIR}
mkdir -p "$REPORT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)
if [ -z "$NCU" ]; then echo "gpu_ncu: ncu not found" >&2; exit 2; fi
status=0
for variant in default unfused; do
  env_args=()
  [ "$variant" = unfused ] && env_args=(MMFAST_CUDA_LA_BACKWARD_FUSED=0)
  env "${env_args[@]}" "$NCU" --clock-control none --profile-from-start off --target-processes all \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \
    --log-file "$REPORT/ncu-$variant.log" \
    python3 benchmarks/probes/linear_attention_kernel_split.py --ncu-target >"$REPORT/ncu-$variant.csv" || status=1
  echo "gpu_ncu: $variant rc=$status, $(grep -c '^"' "$REPORT/ncu-$variant.csv" 2>/dev/null) CSV rows"
done
exit $status
