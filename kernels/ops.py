"""The fused ops the Llama calls (RMSNorm, RoPE, SwiGLU, linear + cross-entropy) and the one choice between backends.

Each op lives in its own file with its plain PyTorch reference. `get_ops(backend)` is the one place
the model's choice between the Triton kernels and the reference is made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from storyllama.kernels._triton_utils import HAS_TRITON
from storyllama.kernels.cross_entropy import (  # noqa: F401
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from storyllama.kernels.rmsnorm import rmsnorm, rmsnorm_reference
from storyllama.kernels.rope import rope, rope_reference
from storyllama.kernels.swiglu import swiglu, swiglu_reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class KernelOps:
    """The four ops the model calls; every backend provides the same signatures.

    rmsnorm(x, weight, eps) -> y                 x (..., C), weight (C,)
    rope(x, cos, sin) -> y                       x (B, T, H, D); cos, sin (B or 1, T, D/2), half-split layout
    swiglu(a, b) -> silu(a) * b                  a, b (..., F)
    linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean") -> loss
                                                 x (N, C), weight (V, C), targets (N,); reduction "mean" or
                                                 "sum"; loss () fp32; chunked, never the full (N, V) logits
    """

    backend: str
    rmsnorm: Callable
    rope: Callable
    swiglu: Callable
    linear_cross_entropy: Callable


# The reference backend's loss is the chunked torch-ops version (what `--fused_ce` uses on CPU);
# `linear_cross_entropy_reference` stays the plain unfused math the tests compare against.
REFERENCE = KernelOps("reference", rmsnorm_reference, rope_reference, swiglu_reference, linear_cross_entropy_chunked)
# The Triton backend: the four ops as registered torch ops (`storyllama::*`). Each runs its Triton kernels on CUDA
# tensors (and on CPU tensors under TRITON_INTERPRET=1) and its PyTorch reference elsewhere, saying once when it
# falls back.
TRITON = KernelOps("triton", rmsnorm, rope, swiglu, linear_cross_entropy)


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """auto -> triton on CUDA, reference elsewhere. Asking for triton off CUDA is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"--kernels must be one of {', '.join(BACKENDS)}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if on_cuda and not HAS_TRITON:
            _say_once(f"kernels=auto: triton is not installed, using the reference ops on {device}")
            return "reference"
        if not on_cuda:
            _say_once(f"kernels=auto: no CUDA device ({device}), using the reference ops")
        return "triton" if on_cuda else "reference"
    if requested == "triton" and not on_cuda:
        raise ValueError("--kernels triton needs a CUDA device; use --kernels reference (or auto) on CPU")
    return requested


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


def get_ops(backend: str) -> KernelOps:
    if backend == "reference":
        return REFERENCE
    if backend == "triton":
        return TRITON
    raise ValueError(f"unknown kernel backend {backend!r}; expected 'triton' or 'reference'")
