#!/usr/bin/env bash
# One device-tool call of a 15-minute GPU lease: scripts/gpu_check.sh in phases, most important
# first, each cut off at a shared deadline so that a slow phase costs the later ones and never
# the report. The report directory is tarred into $OUT/gpu-report.tgz after every phase (the
# device tool returns at most 8 files), with its summary in $OUT/summary.txt.
#   build            sm_90a only (TORCH_CUDA_ARCH_LIST), all cores
#   build-checks     tests/test_extension_build.py: the extension's linking, a C++ error raising
#   cuda tests       the families' tests whose names or markers say cuda, Triton's left out
#                    (8 pytest-xdist workers, as CI runs 2: the suite is xdist-safe)
#   sanitize         compute-sanitizer memcheck over the CUDA smoke tests (racecheck too with
#                    GPU_SANITIZER_TOOLS="memcheck racecheck": it took over 75 s on the H200)
#   bench            the families' benchmarks, a JSON per file (Triton at its fixed config:
#                    autotuning every config of every shape would take the lease; the A/B reruns
#                    only with GPU_CHECK_AB=1)
#   triton tests     the Triton twins on the GPU, with what time is left
#   throw-probe, throw-rebuild (opt-in)  scripts/gpu_throw_probe.sh, without and with its rebuild
#   la-split (opt-in)  benchmarks/probes/linear_attention_kernel_split.py --variants: the
#                    linear attention's per-kernel device time (torch.profiler), JSON in the report
#   ncu (opt-in)     scripts/gpu_ncu.sh: Nsight Compute sections of the linear attention's and
#                    decode's slowest kernels, CSV in the report
# Usage (device tool): MMFAST_COMMIT=<sha> bash scripts/gpu_lease.sh [SECONDS, default 400]
# Knobs: GPU_CHECK_FAMILIES (default all four op families), GPU_LEASE_PHASES (run in the order
# named; default "build build-checks cuda-tests sanitize bench triton-tests"; a later call on
# the same warm machine can skip "build"). Exit status 1 when any phase failed.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-400}
DEADLINE=$(( $(date +%s) + BUDGET - 15 ))  # 15 s kept for the summary and the archive
OUT=${OUT:-build/gpu-lease}
WORK=$(mktemp -d)  # the report's many files stay out of $OUT: the tool returns 8 at most
REPORT=$WORK/report
mkdir -p "$OUT" "$REPORT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GPU_CHECK_FAMILIES=${GPU_CHECK_FAMILIES:-linear_attention vq decode pruned}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, for the phases that skip gpu_check.sh
# a hung test costs 90 s, not the lease (pytest-timeout and pytest-xdist are on the GPU image)
PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
PHASES=" ${GPU_LEASE_PHASES:-build build-checks cuda-tests sanitize bench triton-tests} "  # also: throw-probe, throw-rebuild, la-split, ncu

archive() {
  {
    echo "commit ${MMFAST_COMMIT:-unknown}; $(date -u +%FT%TZ); families: $GPU_CHECK_FAMILIES"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    cat "$OUT/phases.txt" 2>/dev/null
    for f in build.txt tests-cuda.txt sanitizer.txt bench.txt tests.txt throw-probe.log throw-rebuild.log; do
      [ -f "$REPORT/$f" ] && { echo "--- $f (tail)"; tail -n 8 "$REPORT/$f"; }
    done
  } >"$OUT/summary.txt"
  cp "$OUT/summary.txt" "$OUT/phases.txt" "$REPORT/" 2>/dev/null
  tar czf "$OUT/gpu-report.tgz" -C "$WORK" report
}

# phase NAME MAX_SECONDS COMMAND...: COMMAND under min(MAX, time left), output in $REPORT/NAME.log
phase() {
  local name=$1 max=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( left < max ? left : max ))
  if [ "$limit" -lt 20 ]; then echo "$name: skipped, ${left} s left" >>"$OUT/phases.txt"; return 0; fi
  local start rc
  start=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$REPORT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$REPORT/$name.log"
  echo "$name: rc=$rc in $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$OUT/phases.txt"
  archive
  return $rc
}

run_phase() {  # the phases, in the order GPU_LEASE_PHASES names them
  case $1 in
    build) phase build 260 env GPU_CHECK_STEPS=build bash scripts/gpu_check.sh "$REPORT" ;;
    # how the extension is linked, and that a C++ error raises (it segfaulted on the H200 image)
    build-checks) phase build-checks 40 bash -c "cd tests && python3 -m pytest -q -p no:cacheprovider test_extension_build.py" ;;
    throw-probe) phase throw-probe 75 bash scripts/gpu_throw_probe.sh ;;
    cuda-tests)
      phase cuda-tests 120 env GPU_CHECK_STEPS=tests GPU_TEST_K="cuda and not triton" GPU_TEST_ARGS="$PER_TEST $XDIST" \
        bash scripts/gpu_check.sh "$REPORT"
      local rc=$?
      [ -f "$REPORT/tests.txt" ] && cp "$REPORT/tests.txt" "$REPORT/tests-cuda.txt" && cp "$REPORT/tests.xml" "$REPORT/tests-cuda.xml"
      return $rc ;;
    # memcheck alone by default: racecheck over the same smoke tests did not finish in 75 s on the H200
    sanitize) phase sanitize 90 env GPU_CHECK_STEPS=sanitize GPU_SANITIZER_TOOLS="${GPU_SANITIZER_TOOLS:-memcheck}" \
      bash scripts/gpu_check.sh "$REPORT" ;;
    bench) phase bench 200 env GPU_CHECK_STEPS=bench MMFAST_TRITON_AUTOTUNE=0 GPU_CHECK_AB="${GPU_CHECK_AB:-0}" \
      bash scripts/gpu_check.sh "$REPORT" ;;
    triton-tests) phase triton-tests 150 env GPU_CHECK_STEPS=tests GPU_TEST_K=triton GPU_TEST_ARGS="$PER_TEST $XDIST" \
      bash scripts/gpu_check.sh "$REPORT" ;;
    throw-rebuild) phase throw-rebuild 120 env REBUILD=1 bash scripts/gpu_throw_probe.sh ;;
    # per-kernel device time of the linear attention, forward and backward, with its A/B switches
    la-split) phase la-split 120 python3 benchmarks/probes/linear_attention_kernel_split.py --variants \
      --json "$REPORT/linear_attention_kernel_split.json" ;;
    # hardware counters (Nsight Compute, clocks left alone) of the linear attention's kernels
    # (one forward + backward at N = 256K, D = 64, bf16; backward fused and unfused) and of
    # issue 9's decode_attention and sampler at their target shapes (GPU_NCU_TARGETS)
    ncu) phase ncu 150 bash scripts/gpu_ncu.sh "$REPORT" ;;
    *) echo "gpu-lease: unknown phase $1" | tee -a "$OUT/phases.txt"; return 2 ;;
  esac
}

: >"$OUT/phases.txt"
status=0
for name in $PHASES; do
  run_phase "$name" || status=1
  if [ "$name" = build ] && [ $status -ne 0 ]; then echo "gpu-lease: build failed"; break; fi
done
archive
cat "$OUT/summary.txt"
exit $status
