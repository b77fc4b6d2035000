"""The Triton backend: the four ops as registered torch ops (`storyllama::*`).

Each op runs its Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and its
PyTorch reference elsewhere, saying once when it falls back.
"""

from __future__ import annotations

from kernels import KernelOps
from kernels.cross_entropy import linear_cross_entropy
from kernels.rmsnorm import rmsnorm
from kernels.rope import rope
from kernels.swiglu import swiglu

TRITON = KernelOps("triton", rmsnorm, rope, swiglu, linear_cross_entropy)
