#!/usr/bin/env bash
# `make gpu-check`: validate the CUDA kernels on a machine with an NVIDIA GPU and no
# network. Builds in place against the installed torch for the local GPU's arch (all
# cores), runs the whole test suite (CUDA tests included) and the benchmark suite on the
# GPU, and writes info.txt, tests.txt/.xml, bench.json/.md/.png and report.json into
# the report directory. Installs nothing.
#
# GPU_CHECK_STEPS (default "build tests bench") runs a subset, e.g. "build tests" in one
# device call and "bench" in the next on the same warm machine (the in-place build stays).
set -uo pipefail
STEPS=" ${GPU_CHECK_STEPS:-build tests bench} "
cd "$(dirname "$0")/.."
REPORT_DIR=$(mkdir -p "${1:-build/gpu-report}" && cd "${1:-build/gpu-report}" && pwd)
PY=$(command -v "${PYTHON:-python3}") || { echo "gpu-check: no ${PYTHON:-python3}" >&2; exit 1; }
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the steps below cd

ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}' + ('a' if m in (9, 10, 12) else ''))") || {
  echo "gpu-check: no CUDA device visible to torch" >&2
  exit 1
}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried by `make gpu-wheels`
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmfast-site .whl/*.whl \
    && export PYTHONPATH="/tmp/mmfast-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_CUDA_ARCH_LIST="$ARCH" MMFAST_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [[ $STEPS == *" build "* ]]; then
  echo "gpu-check: building for sm_$ARCH with MAX_JOBS=$MAX_JOBS" | tee "$REPORT_DIR/build.txt"
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
  (cd tests && $PY -m pytest -q -rs -p no:cacheprovider --junitxml="$REPORT_DIR/tests.xml" ${GPU_TEST_ARGS:-}) \
    >"$REPORT_DIR/tests.txt" 2>&1
  tests_rc=$?
  tail -n 40 "$REPORT_DIR/tests.txt"
fi

bench_rc=0
if [[ $STEPS == *" bench "* ]]; then
  (cd benchmarks && $PY -m pytest -q -p no:cacheprovider --benchmark-json="$REPORT_DIR/bench.json" ${GPU_BENCH_ARGS:-}) \
    >"$REPORT_DIR/bench.txt" 2>&1
  bench_rc=$?
  tail -n 15 "$REPORT_DIR/bench.txt"
  $PY benchmarks/summarize.py "$REPORT_DIR/bench.json" --markdown "$REPORT_DIR/bench.md" --plot "$REPORT_DIR/bench.png"
fi

COMMIT=${MMFAST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
$PY - "$REPORT_DIR" "$COMMIT" "$tests_rc" "$bench_rc" <<'PYEOF'
import datetime, json, sys, torch
report_dir, commit, tests_rc, bench_rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    summary = open(f"{report_dir}/tests.txt").read().strip().splitlines()[-1:]
except OSError:
    summary = ["tests not run in this call"]
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit,
    "gpu": torch.cuda.get_device_name(),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "tests_rc": tests_rc, "tests_summary": summary,
    "bench_rc": bench_rc,
}, open(f"{report_dir}/report.json", "w"), indent=2)
PYEOF
echo "gpu-check: tests rc=$tests_rc, benchmarks rc=$bench_rc; report in $REPORT_DIR"
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
