"""The Triton backend: the four ops as registered torch ops (`storyllama::*`).

Each op runs its Triton kernels on CUDA tensors (and on CPU tensors under TRITON_INTERPRET=1) and its
PyTorch reference elsewhere, saying once when it falls back.
"""

from __future__ import annotations

from storyllama.kernels.cross_entropy import linear_cross_entropy
from storyllama.kernels.ops import KernelOps
from storyllama.kernels.rmsnorm import rmsnorm
from storyllama.kernels.rope import rope
from storyllama.kernels.swiglu import swiglu

TRITON = KernelOps("triton", rmsnorm, rope, swiglu, linear_cross_entropy)
