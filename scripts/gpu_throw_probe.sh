#!/usr/bin/env bash
# Probe for the GPU image's crash on an mmfast error (2026-12-04, H200 image, torch 2.11): a
# C++ exception thrown by mmfast's extension (TORCH_CHECK) ended the process with SIGSEGV instead
# of raising in Python. Prints the toolchain, the libraries the extension loads, whether a throw
# from torch itself and one from mmfast raise, a native backtrace of the mmfast one (cuda-gdb
# debugs host code), and, with REBUILD=1 and another g++ on the machine, whether a build with
# that compiler raises. Run after the in-place build; writes to stdout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
THROW='import torch, mmfast
try:
    torch.ops.mmfast.vq_dequantize(torch.tensor([1, 50]), torch.randn(50, 12), False)
except IndexError as error:
    print("raised IndexError:", str(error).splitlines()[0])'

echo "== toolchain: CC=${CC:-} CXX=${CXX:-}"
for compiler in "${CXX:-}" /usr/bin/g++ "$(command -v g++)"; do
  [ -n "$compiler" ] && [ -x "$compiler" ] && echo "$compiler: $("$compiler" --version | head -n 1)"
done
SO=$(ls python/mmfast/_C*.so)
echo "== ldd $SO"; ldd "$SO" | grep -E "stdc|gcc_s|gomp|c10|torch_cpu"
echo "== .comment"; readelf -p .comment "$SO" 2>/dev/null | grep -v "^$" | head -n 6
python3 - <<'EOF'
import torch, mmfast  # noqa: F401
print("torch CXX11 ABI:", torch._C._GLIBCXX_USE_CXX11_ABI)
libs = {line.split()[-1] for line in open("/proc/self/maps") if any(k in line for k in ("stdc++", "gcc_s", "gomp"))}
print("loaded:", *sorted(libs), sep="\n  ")
EOF
echo "== a throw from torch itself"
python3 -c "import torch
try: torch.randn(3).view(5)
except RuntimeError: print('raised RuntimeError')"; echo "rc=$?"
echo "== a throw from mmfast"
python3 -X faulthandler -c "$THROW" 2>&1 | tail -n 5; echo "rc=${PIPESTATUS[0]}"
echo "== native backtrace (cuda-gdb)"
timeout 60 cuda-gdb -q -batch -ex run -ex bt --args python3 -c "$THROW" 2>&1 \
  | grep -E "^#|signal|SIG" | head -n 40  # the frames, not the thread and library chatter
if [ "${REBUILD:-0}" = 1 ] && [ -x /usr/bin/g++ ] && [ "$(readlink -f /usr/bin/g++)" != "$(readlink -f "${CXX:-$(command -v g++)}")" ]; then
  echo "== rebuild with /usr/bin/gcc, /usr/bin/g++"
  rm -rf build python/mmfast/_C*.so
  start=$(date +%s)
  CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py build_ext --inplace >/tmp/rebuild.txt 2>&1; echo "rc=$? in $(( $(date +%s) - start )) s"
  grep -E "error" /tmp/rebuild.txt | head -n 5
  python3 -X faulthandler -c "$THROW" 2>&1 | tail -n 5; echo "rc=${PIPESTATUS[0]}"
  (cd tests && python3 -m pytest -q -p no:cacheprovider -x test_decode_cuda.py::test_cuda_attention_head_dim_above_256_raises \
     "test_vq.py::test_dequantize_out_of_range" 2>&1 | tail -n 3)
fi
