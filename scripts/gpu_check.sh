#!/usr/bin/env bash
# `make gpu-check`: validate the CUDA (and Triton) kernels on a machine with an NVIDIA GPU and
# no network. Builds in place against the installed torch for the local GPU's arch (all
# cores), runs the tests, compute-sanitizer over the CUDA smoke tests, and the benchmarks on
# the GPU, and writes a report into the report directory (default build/gpu-report):
#   preflight.txt build.txt info.txt tests.txt/.xml sanitizer.txt bench.txt report.json
#   bench_<family>.json/.md/.png (one per benchmark file)
#   bench-staged.txt/.json/.md (linear attention forward with MMFAST_CUDA_ASYNC_COPY=0: the A/B)
#   bench-vq-mma-sync.txt/.json/.md (the VQ search with MMFAST_CUDA_WGMMA=0: mma.sync instead of
#                       wgmma on sm_90a, its A/B)
#   bench-decode-tiled.txt/.json/.md (decode_attention with MMFAST_CUDA_DECODE_STREAM=0: the tiled
#                       kernel that the stream kernel replaces for 16-bit MHA-like shapes)
#   bench-sample-one-block.txt/.json/.md (sample with MMFAST_CUDA_SAMPLE_CLUSTERS=0: one block per
#                       row instead of a thread-block cluster per row)
#   bench-pruned-mma-sync.txt/.json/.md (masked_conv2d with MMFAST_CUDA_WGMMA=0: mma.sync instead of
#                       wgmma on sm_90a)
#   bench-pruned-nosplit.txt/.json/.md (masked_conv2d with MMFAST_CUDA_CONV_SPLITS=1: the split
#                       reduction's A/B at the small levels)
# Installs nothing (wheels carried in .whl/ by `make gpu-wheels` are put on PYTHONPATH).
#
# Knobs (environment):
#   GPU_CHECK_STEPS     default "build tests sanitize bench"; e.g. "build tests" in one device
#                       call and "bench" in the next on the same warm machine (the build stays)
#   GPU_CHECK_FAMILIES  op families whose tests/benchmarks run (tests/test_<family>*.py,
#                       benchmarks/bench_<family>*.py), default all: "linear_attention linfusion"
#   GPU_CHECK_QUICK=1   issue 14's quick mode: build for sm_90a only, the linear-attention (and VQ)
#                       tests and benchmarks, memcheck only (racecheck did not finish in 75 s on the
#                       H200); GPU_CHECK_FAMILIES picks others (e.g. "vq pruned decode", whose sm_90a
#                       kernels never ran on a GPU). A 15-minute lease runs scripts/gpu_lease.sh
#                       instead: its phases share one deadline
#   GPU_TEST_ARGS, GPU_BENCH_ARGS   extra pytest arguments (split on spaces)
#   GPU_CHECK_AB=0      skip the benchmarks' A/B reruns (MMFAST_CUDA_ASYNC_COPY=0, ..._WGMMA=0,
#                       ..._CONV_SPLITS=1, ..._DECODE_STREAM=0, ..._SAMPLE_CLUSTERS=0)
#   GPU_TEST_K          a pytest -k expression for the tests, e.g. "cuda and not triton"
#   GPU_SANITIZER_TOOLS default "memcheck racecheck" ("memcheck" with GPU_CHECK_QUICK=1)
# The tests run the Triton kernels' fixed launch configs (MMFAST_TRITON_AUTOTUNE=0: the many
# small test shapes would each compile and time every config); the benchmarks autotune.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  : "${GPU_CHECK_FAMILIES:=linear_attention vq}" "${TORCH_CUDA_ARCH_LIST:=9.0a}" "${GPU_SANITIZER_TOOLS:=memcheck}"
  export TORCH_CUDA_ARCH_LIST GPU_CHECK_FAMILIES GPU_SANITIZER_TOOLS  # the preflight reads the families too
fi
STEPS=" ${GPU_CHECK_STEPS:-build tests sanitize bench} "
REPORT_DIR=$(mkdir -p "${1:-build/gpu-report}" && cd "${1:-build/gpu-report}" && pwd)
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu-check: no ${PYTHON:-python3}" >&2; exit 1; }
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the steps below cd

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried by `make gpu-wheels`
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmfast-site .whl/*.whl \
    && export PYTHONPATH="/tmp/mmfast-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

# --- preflight: name everything missing before spending device time -----------------------
$PY scripts/gpu_preflight.py | tee "$REPORT_DIR/preflight.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu-check: preflight failed (see above)" >&2; exit 1; }

ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m in (9, 10, 12) else ''))")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" MMFAST_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}

FAMILIES=${GPU_CHECK_FAMILIES:-}
files_of() {  # files_of DIR PREFIX: the test/bench files of the chosen families (all when none chosen)
  local dir=$1 prefix=$2
  if [ -z "$FAMILIES" ]; then (cd "$dir" && ls ${prefix}*.py | tr '\n' ' '); return; fi
  {
    for family in $FAMILIES; do ls "$dir/${prefix}${family}"*.py 2>/dev/null | xargs -r -n1 basename; done
    # the Triton helpers every family shares (split_dot, divide, output rounding): its tests carry
    # "triton" in their module name, so GPU_TEST_K="triton" selects them and "not triton" leaves them
    [ "$prefix" = test_ ] && ls "$dir/test_triton_common.py" 2>/dev/null | xargs -r -n1 basename
  } | tr '\n' ' '
}

if [[ $STEPS == *" build "* ]]; then
  echo "gpu-check: building for $TORCH_CUDA_ARCH_LIST with MAX_JOBS=$MAX_JOBS" | tee "$REPORT_DIR/build.txt"
  start=$(date +%s)
  $PY setup.py build_ext --inplace >>"$REPORT_DIR/build.txt" 2>&1
  build_rc=$?
  echo "build rc=$build_rc in $(( $(date +%s) - start )) s" | tee -a "$REPORT_DIR/build.txt"
  tail -n 30 "$REPORT_DIR/build.txt"
  [ $build_rc -eq 0 ] || exit $build_rc
fi

$PY -m mmfast | tee "$REPORT_DIR/info.txt"

tests_rc=0
if [[ $STEPS == *" tests "* ]]; then
  # -v: a line per test as it ends, so a run cut off by the lease's deadline still says which passed
  (cd tests && MMFAST_TRITON_AUTOTUNE=0 $PY -m pytest -v -rs -p no:cacheprovider --junitxml="$REPORT_DIR/tests.xml" \
     ${GPU_TEST_K:+-k "$GPU_TEST_K"} $(files_of . test_) ${GPU_TEST_ARGS:-}) >"$REPORT_DIR/tests.txt" 2>&1
  tests_rc=$?
  tail -n 40 "$REPORT_DIR/tests.txt"
fi

# compute-sanitizer on PATH, else in the toolkit the build uses (CUDA_HOME, or torch's guess of it).
find_sanitizer() {
  command -v compute-sanitizer && return
  local home=${CUDA_HOME:-$($PY -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)}
  local candidate
  for candidate in "$home/bin/compute-sanitizer" "$home/compute-sanitizer/compute-sanitizer"; do
    if [ -n "$home" ] && [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
}

sanitizer_rc=0
if [[ $STEPS == *" sanitize "* ]]; then
  SANITIZER=$(find_sanitizer)
  if [ -z "$SANITIZER" ]; then
    echo "gpu-check: compute-sanitizer not found; sanitizer step skipped" | tee "$REPORT_DIR/sanitizer.txt"
  else
    : >"$REPORT_DIR/sanitizer.txt"
    for tool in ${GPU_SANITIZER_TOOLS:-memcheck racecheck}; do  # every mmfast CUDA kernel stages tiles in shared memory
      echo "== compute-sanitizer --tool $tool: CUDA smoke tests" >>"$REPORT_DIR/sanitizer.txt"
      (cd tests && MMFAST_TRITON_AUTOTUNE=0 "$SANITIZER" --tool $tool --error-exitcode 99 --print-limit 20 \
         $PY -m pytest -q -p no:cacheprovider -m cuda -k smoke $(files_of . test_)) >>"$REPORT_DIR/sanitizer.txt" 2>&1
      rc=$?
      echo "== $tool rc=$rc" >>"$REPORT_DIR/sanitizer.txt"
      [ $rc -eq 0 ] || sanitizer_rc=$rc
    done
    grep -E "^== |ERROR SUMMARY|passed|failed" "$REPORT_DIR/sanitizer.txt"
  fi
fi

bench_rc=0
AB=${GPU_CHECK_AB:-1}
if [[ $STEPS == *" bench "* ]]; then
  # One JSON per file, written as each file ends: a step cut off by a deadline keeps what finished.
  : >"$REPORT_DIR/bench.txt"
  for file in $(files_of benchmarks bench_); do
    [ -n "$file" ] || continue
    stem=${file%.py}
    file_rc=0
    rm -f "$REPORT_DIR/$stem.json" "$REPORT_DIR/$stem.rows.jsonl"  # a reused report folder: this run's only
    # ... and a row per benchmark as it ends (MMFAST_BENCH_ROWS): a file cut off mid-way keeps those
    (cd benchmarks && MMFAST_BENCH_ROWS="$REPORT_DIR/$stem.rows.jsonl" $PY -m pytest -q -p no:cacheprovider \
       --benchmark-json="$REPORT_DIR/$stem.json" "$file" ${GPU_BENCH_ARGS:-}) >>"$REPORT_DIR/bench.txt" 2>&1 || file_rc=$?
    [ $file_rc -eq 0 ] || bench_rc=$file_rc
    rows="$REPORT_DIR/$stem.json"  # cut off before pytest wrote it: the rows that finished
    [ -f "$rows" ] || rows="$REPORT_DIR/$stem.rows.jsonl"
    $PY benchmarks/summarize.py "$rows" --markdown "$REPORT_DIR/$stem.md" \
      --plot "$REPORT_DIR/$stem.png" >>"$REPORT_DIR/bench.txt" 2>&1 || true
    echo "gpu-check: $file done (rc=$file_rc)" | tee -a "$REPORT_DIR/bench.txt"
  done
  if [[ $AB == 1 && ( " $FAMILIES " == *" linear_attention "* || -z "$FAMILIES" ) ]]; then
    # A/B: the register-staged kernels the cp.async ones replace, same shapes, same machine
    (cd benchmarks && MMFAST_CUDA_ASYNC_COPY=0 $PY -m pytest -q -p no:cacheprovider -k forward \
       --benchmark-json="$REPORT_DIR/bench-staged.json" bench_linear_attention.py) >"$REPORT_DIR/bench-staged.txt" 2>&1 \
      || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-staged.json" --markdown "$REPORT_DIR/bench-staged.md" || true
  fi
  if [[ $AB == 1 && ( " $FAMILIES " == *" vq "* || -z "$FAMILIES" ) ]]; then
    # A/B: the VQ search on mma.sync (vq_search_async_kernel), which the wgmma one replaces on sm_90a
    (cd benchmarks && MMFAST_CUDA_WGMMA=0 $PY -m pytest -q -p no:cacheprovider -k "test_vq_quantize and not paired" \
       --benchmark-json="$REPORT_DIR/bench-vq-mma-sync.json" bench_vq.py) >"$REPORT_DIR/bench-vq-mma-sync.txt" 2>&1 \
      || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-vq-mma-sync.json" --markdown "$REPORT_DIR/bench-vq-mma-sync.md" || true
  fi
  if [[ $AB == 1 && ( " $FAMILIES " == *" decode "* || -z "$FAMILIES" ) ]]; then
    # A/B: decode_attention on the tiled kernel (K and V tiles through shared memory) instead of
    # the stream kernel, for the shapes the stream kernel takes (Liquid's MHA)
    (cd benchmarks && MMFAST_CUDA_DECODE_STREAM=0 $PY -m pytest -q -p no:cacheprovider \
       -k "test_decode_attention and liquid" \
       --benchmark-json="$REPORT_DIR/bench-decode-tiled.json" bench_decode.py) >"$REPORT_DIR/bench-decode-tiled.txt" \
       2>&1 || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-decode-tiled.json" --markdown "$REPORT_DIR/bench-decode-tiled.md" \
      || true
    # A/B: the sampler with one block per row instead of a thread-block cluster per row
    (cd benchmarks && MMFAST_CUDA_SAMPLE_CLUSTERS=0 $PY -m pytest -q -p no:cacheprovider -k "test_sample" \
       --benchmark-json="$REPORT_DIR/bench-sample-one-block.json" bench_decode.py) \
       >"$REPORT_DIR/bench-sample-one-block.txt" 2>&1 || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-sample-one-block.json" \
      --markdown "$REPORT_DIR/bench-sample-one-block.md" || true
  fi
  if [[ $AB == 1 && ( " $FAMILIES " == *" pruned "* || -z "$FAMILIES" ) ]]; then
    # A/B: the packed masked conv on mma.sync, which the wgmma multiplier replaces on sm_90a
    (cd benchmarks && MMFAST_CUDA_WGMMA=0 $PY -m pytest -q -p no:cacheprovider -k "test_masked_conv2d and not paired" \
       --benchmark-json="$REPORT_DIR/bench-pruned-mma-sync.json" bench_pruned.py) \
       >"$REPORT_DIR/bench-pruned-mma-sync.txt" 2>&1 || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-pruned-mma-sync.json" --markdown "$REPORT_DIR/bench-pruned-mma-sync.md" \
      || true
    # A/B: the packed masked conv without its split reduction (the levels whose tiles may split)
    (cd benchmarks && MMFAST_CUDA_CONV_SPLITS=1 $PY -m pytest -q -p no:cacheprovider \
       -k "test_masked_conv2d and not paired and (12x12 or 24x24 or 16x16 or 8x8)" \
       --benchmark-json="$REPORT_DIR/bench-pruned-nosplit.json" bench_pruned.py) \
       >"$REPORT_DIR/bench-pruned-nosplit.txt" 2>&1 || bench_rc=$?
    $PY benchmarks/summarize.py "$REPORT_DIR/bench-pruned-nosplit.json" --markdown "$REPORT_DIR/bench-pruned-nosplit.md" \
      || true
  fi
fi

COMMIT=${MMFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
$PY - "$REPORT_DIR" "$COMMIT" "$tests_rc" "$sanitizer_rc" "$bench_rc" "$STEPS" "$FAMILIES" "${GPU_TEST_K:-}" <<'PYEOF'
# report.json gathers every call's steps (gpu_lease.sh runs one step per call): a step's
# outcome is replaced only by a later run of that step (tests: with the same -k) on the same commit
import datetime, json, os, sys, torch
report_dir, commit, tests_rc, sanitizer_rc, bench_rc, steps, families, test_k = sys.argv[1:9]
path = f"{report_dir}/report.json"
def last_line(name):
    try:
        return open(f"{report_dir}/{name}").read().strip().splitlines()[-1:]
    except (OSError, IndexError):
        return [f"{name}: not run in this call"]
try:
    report = json.load(open(path)) if os.path.exists(path) else {}
except ValueError:
    report = {}
if report.get("commit") != commit or not isinstance(report.get("steps"), dict):  # another commit, an old layout
    report = {}
outcomes = {"build": {}, "tests": {"tests_rc": int(tests_rc), "tests_summary": last_line("tests.txt"),
                                   "families": families.split() or "all"},
            "sanitize": {"sanitizer_rc": int(sanitizer_rc)}, "bench": {"bench_rc": int(bench_rc)}}
report.setdefault("steps", {})
for step in steps.split():
    key = f"tests -k {test_k}" if step == "tests" and test_k else step
    report["steps"][key] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             **outcomes.get(step, {})}
report.update({"commit": commit, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cuda": torch.version.cuda})
json.dump(report, open(path, "w"), indent=2)
PYEOF
echo "gpu-check: tests rc=$tests_rc, sanitizer rc=$sanitizer_rc, benchmarks rc=$bench_rc; report in $REPORT_DIR"
[ $tests_rc -eq 0 ] && [ $sanitizer_rc -eq 0 ] && [ $bench_rc -eq 0 ]
