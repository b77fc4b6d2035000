#!/usr/bin/env bash
# The GPU check, one command, one table; installs nothing (needs python with a CUDA torch, triton, pytest).
#   benchmarks/gpu_check.sh             on one GPU, under 8 minutes on an H200 (most of it torch.compile)
#   benchmarks/gpu_check.sh --dry-run   every stage on tiny shapes, on CPU too (tests/test_gpu_check.py runs it)
# Stages (benchmarks/gpu_check.py says more): the kernel tests on CUDA (GPU_TESTS=all: the whole file);
# per-kernel ms and GB/s against eager and torch.compile of the reference; training tokens/s and MFU for
# `small` and `storyllama-88m`, kernels off/on x compile off/on; sampler tokens/s at batch 1 and 8, the
# compiled (CUDA-graph) step against the eager step and the bandwidth ceiling; the NCCL world-size-1 DDP
# overhead. Env: PYTHON=... to choose the interpreter; STORYLLAMA_PEAK_TFLOPS=... when the GPU is not in
# storyllama.metrics' peak table (MFU is against the dense bf16 peak).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
want_cuda="import sys, torch; sys.exit(not torch.cuda.is_available())"
[ "$dry" = 1 ] && want_cuda="import torch"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "$want_cuda" 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "gpu_check: no python with a CUDA build of torch found (set PYTHON=...)" >&2; exit 1; }
exec "$PY" benchmarks/gpu_check.py "$@"
