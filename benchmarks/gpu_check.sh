#!/usr/bin/env bash
# The kernels' GPU check, one command, installs nothing (needs python with a CUDA torch, triton, pytest):
#   1. the kernel tests on CUDA: the GPU-marked ones by default, or the whole file with GPU_TESTS=all
#      (every interpreter test then runs on the GPU: many Triton compiles, a few minutes);
#   2. per kernel, forward + backward ms and GB/s for eager PyTorch, torch.compile of the reference and
#      Triton (bf16, storyllama-88m shapes at 16 x 512 tokens), the fused linear + cross-entropy's
#      TFLOP/s and peak memory, and storyllama-88m training tokens/s and MFU (bf16 autocast, compile)
#      with the kernels off (reference ops, unfused loss) and on (Triton ops, fused loss).
# Env: PYTHON=... to choose the interpreter; STORYLLAMA_PEAK_TFLOPS=... when the GPU is not in the
# spec table of benchmarks/test_bench_kernels.py (MFU is against the dense bf16 spec peak).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null
    then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "gpu_check: no python with a CUDA build of torch found (set PYTHON=...)" >&2; exit 1; }
"$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

echo "== kernel tests on CUDA"
if [ "${GPU_TESTS:-gpu}" = all ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py; tests=$?
else
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py; tests=$?
fi

echo "== kernel speed and storyllama-88m training"
"$PY" benchmarks/test_bench_kernels.py gpu; bench=$?

echo "== gpu_check: tests exit $tests, benchmarks exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
