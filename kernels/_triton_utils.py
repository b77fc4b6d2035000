"""What every kernel file shares: the Triton import, the one eligibility check, launch-size helpers.

Triton ships for Linux only. Without it, `triton.jit` below is a stand-in that leaves the kernel
functions undecorated, so the op files still import (their references and torch fallbacks work) and
`use_triton` says no.

Triton's interpreter (`TRITON_INTERPRET=1`, read when triton is first imported) runs the kernels on
CPU tensors with numpy; the tests use it. On CPU without it the ops take the PyTorch reference.
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace

import torch

log = logging.getLogger("kernels")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - only off Linux
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    tl = SimpleNamespace(constexpr=None)

# Triton kernels compute in fp32 internally; fp64 inputs would lose precision, so they take the reference.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _probe(X):  # decorated when the kernel files are imported, so it was built the way theirs were
    pass


@functools.cache
def interpreted() -> bool:
    """True when @triton.jit built interpreted kernels (TRITON_INTERPRET=1 was set before the import)."""
    if not HAS_TRITON:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return os.environ.get("TRITON_INTERPRET") == "1"
    return isinstance(_probe, InterpretedFunction)


_fallbacks_said: set[tuple[str, str]] = set()


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """The one eligibility check: Triton for CUDA tensors (or CPU tensors under the interpreter) of
    fp32/fp16/bf16; otherwise the PyTorch reference, said once per (op, reason)."""
    t = tensors[0]
    reason = None
    if not HAS_TRITON:
        reason = "triton is not installed"
    elif t.device.type == "cuda":
        pass
    elif t.device.type == "cpu" and interpreted():
        pass
    else:
        reason = f"no Triton backend for {t.device.type} tensors (TRITON_INTERPRET=1 runs them on CPU)"
    if reason is None and any(x.dtype not in TRITON_DTYPES for x in tensors if x.is_floating_point()):
        reason = f"dtype {[x.dtype for x in tensors]} (Triton path takes fp32/fp16/bf16)"
    if reason is None:
        return True
    if (op, reason) not in _fallbacks_said:
        _fallbacks_said.add((op, reason))
        log.info("kernels: %s falls back to the PyTorch reference: %s", op, reason)
    return False


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int) -> int:
    """Programs for a grid-stride kernel: a few per SM on CUDA; a handful under the interpreter,
    where every program is a sequential Python loop."""
    if device.type == "cuda":
        return max(1, min(work_items, 4 * _sm_count(device.index or torch.cuda.current_device())))
    return max(1, min(work_items, 4))


def warps_for(tile_elems: int) -> int:
    # About 16 fp32 values per thread: 4 warps up to 2k-element tiles, 8 up to 8k, 16 beyond.
    return 4 if tile_elems <= 2048 else 8 if tile_elems <= 8192 else 16
