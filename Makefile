# mmfast developer commands. `make test` and `make bench` set everything up on a fresh
# machine (virtual environment, dependencies, build) and then run.
#
#   make test        build (CPU + CUDA kernels when nvcc is found) and run the test suite
#                    (pytest-xdist: PYTEST_WORKERS processes, default 2; 0: one process, no xdist)
#   make bench       build and run the benchmark suite, print the summary tables (PYTEST_ARGS: e.g.
#                    "-m vq" for one family; benchmarks/README.md lists the families and variables)
#   make gpu-check   on a GPU machine without network: build for the local GPU with the
#                    installed torch, run tests + benchmarks, write a report to GPU_REPORT_DIR
#   make cmake-test  build the torch-free kernels with CMake and run the C++ tests (the CUDA
#                    kernels on the host emulator included)
#   make sanitize    the same C++ tests built with AddressSanitizer + UBSan (part of make test)
#   make sass-report registers, spills, occupancy and global-load parallelism of the linear-attention
#                    kernels from their sm_90a SASS (no GPU; needs nvcc; installs the nvidia-cuda-cuobjdump
#                    and nvidia-cuda-nvdisasm wheels); SASS_REPORT_ARGS: see scripts/sass_report.py
#   make triton-report registers, spills and shared memory of the Triton linear-attention and VQ
#                    kernels per autotune config, from an offline sm_90 compile (no GPU, no nvcc; a
#                    few minutes); TRITON_REPORT_ARGS: see scripts/triton_report.py

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
GPU_REPORT_DIR ?= build/gpu-report
SASS_REPORT_ARGS ?= --json build/sass-report.json
TRITON_REPORT_ARGS ?= --json build/triton-report.json

VPY := $(abspath $(VENV))/bin/python
STAMP := $(VENV)/.mmfast-deps

.PHONY: test bench build venv gpu-check gpu-lease gpu-wheels cmake-test sanitize sass-report triton-report build-sm75 clean

# nvidia-cutlass with --no-deps: CUTLASS's headers only (CuTe, the oracle of tests/test_gmma_layout.py),
# not its Python tools' dependencies.
# A fresh install needs about VENV_FREE_GB of disk (warned before, `df` shown if pip fails).
VENV_FREE_GB ?= 8
PIP_FAILED = { bash scripts/check_free_space.sh --df "$(abspath $(VENV))"; exit 1; }
$(STAMP): requirements-test.txt
	@bash scripts/check_free_space.sh "$(abspath $(VENV))" $(VENV_FREE_GB)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip || $(PIP_FAILED)
	$(VPY) -m pip install --quiet "$(TORCH_SPEC)" -r requirements-test.txt || $(PIP_FAILED)
	$(VPY) -m pip install --quiet --no-deps "nvidia-cutlass==4.2.0.0" || $(PIP_FAILED)
	touch $(STAMP)

venv: $(STAMP)

# The whole pip log goes to build/pip-install.log; a failed build fails here (its errors shown), so a
# stale extension from an earlier build is never tested by mistake.
build: $(STAMP)
	mkdir -p build
	MAX_JOBS=$(MAX_JOBS) $(VPY) -m pip install --no-build-isolation --no-deps -e . > build/pip-install.log 2>&1 \
	  && tail -n 3 build/pip-install.log \
	  || { grep -n -E "error|Error" build/pip-install.log | head -n 40; tail -n 20 build/pip-install.log; exit 1; }
	$(VPY) -m mmfast

test: build cmake-test sanitize
	cd tests && $(VPY) -m pytest -q -p no:cacheprovider $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS)) $(PYTEST_ARGS)

# -v: each benchmark's line as it ends (some take minutes); -rs: why each skipped one skipped. The
# summary is printed even when a benchmark fails (make then fails with pytest's status, else with
# summarize's); a stale build/bench.json is removed first, never summarized as this run's.
bench: build
	mkdir -p build && rm -f build/bench.json
	cd benchmarks && $(VPY) -m pytest -v -rs -p no:cacheprovider --benchmark-json=../build/bench.json $(PYTEST_ARGS); \
	  status=$$?; cd .. && $(VPY) benchmarks/summarize.py build/bench.json --markdown build/bench.md \
	  --plot build/bench.png; summary=$$?; [ $$status -ne 0 ] && exit $$status; exit $$summary

cmake-test:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j $(MAX_JOBS) > /dev/null
	cd build/cmake && ctest --output-on-failure -j $(MAX_JOBS)

# ASan + UBSan (no recovery: the first finding fails the run) over the torch-free kernels, their
# C++ tests and the emulated CUDA kernels (quick case level: instrumented fibers are slow). The
# linear-attention backward's A/B variants (3 blocks, unfused sums), the sampler's (match
# counts) and the second schedule seed run in cmake-test only: instrumented the 3-block one took
# 139 s of the CI run, for one ring depth of one kernel.
sanitize:
	cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMMFAST_SANITIZE=address,undefined \
	  -DMMFAST_EMULATOR_LEVEL=0 > /dev/null
	cmake --build build/sanitize -j $(MAX_JOBS) > /dev/null
	cd build/sanitize && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(MAX_JOBS) -E '_(3blocks|unfused|match_counts|seed2)$$'

# Compiles csrc/cuda/linear_attention.cu for sm_90a on its own (nvcc -cubin, the build's flags) and
# prints the SASS table; --arch, --source, --keep DIR, --json PATH go in SASS_REPORT_ARGS.
sass-report: $(STAMP)
	mkdir -p build
	$(VPY) -m pip install --quiet nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm 2>/dev/null || \
	  echo "sass-report: could not install the cuobjdump / nvdisasm wheels; using the toolkit's if present"
	$(VPY) scripts/sass_report.py $(SASS_REPORT_ARGS)

triton-report: $(STAMP)
	$(VPY) scripts/triton_report.py $(TRITON_REPORT_ARGS)

# The whole extension built for sm_75 only (Turing: no cp.async, ldmatrix, bf16 mma or wgmma;
# the tensor-core code must sit behind its arch guards), into build/sm75 (not installed);
# about 8 minutes on 2 cores. Not part of `make test`; .ci/run runs it after (2026-12-06: builds,
# nvcc 13.0).
build-sm75: $(STAMP)
	mkdir -p build
	TORCH_CUDA_ARCH_LIST=7.5 MAX_JOBS=$(MAX_JOBS) $(VPY) setup.py build_ext --build-temp build/sm75/temp \
	  --build-lib build/sm75/lib > build/sm75.log 2>&1 || { tail -n 40 build/sm75.log; exit 1; }
	@grep -c "gencode=arch=compute_75,code=sm_75" build/sm75.log | xargs echo "build-sm75: CUDA sources compiled for sm_75:"

# The GPU machine has torch, triton, nvcc, pytest and pytest-benchmark but no network:
# build against its torch, for its own GPU, with all cores; install nothing.
# GPU_CHECK_QUICK=1 (sm_90a, memcheck only, linear attention and VQ by default), GPU_CHECK_STEPS, GPU_CHECK_FAMILIES:
# see scripts/gpu_check.sh.
gpu-check:
	bash scripts/gpu_check.sh "$(GPU_REPORT_DIR)"

# One call of a 15-minute device lease: gpu-check in phases (build, CUDA tests, sanitizer,
# benchmarks, Triton tests) under one deadline (GPU_LEASE_SECONDS), archived into $OUT.
GPU_LEASE_SECONDS ?= 400
gpu-lease:
	bash scripts/gpu_lease.sh $(GPU_LEASE_SECONDS)

# Wheels the GPU machine lacks (it has no network), downloaded here into .whl/ (ignored by
# git) for the device tool's `carry`; gpu_check.sh installs them when .whl/ is present. Only the
# model families' tests need them (the op families do not). diffusers pinned to the version the
# tests run here (a newer one may need a newer huggingface_hub than the GPU image's); the image
# has hypothesis and sortedcontainers already. A fresh folder (two versions of a wheel fail pip),
# replacing the old one only once the download succeeded.
GPU_WHEELS ?= diffusers==0.42.1 importlib_metadata
gpu-wheels:
	rm -rf .whl.new
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .whl.new $(GPU_WHEELS)
	rm -rf .whl && mv .whl.new .whl  # swapped in only after the whole download succeeded

clean:
	rm -rf build python/mmfast/_C*.so python/mmfast/_build_info.py *.egg-info python/*.egg-info
