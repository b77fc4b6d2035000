"""SwiGLU gate: silu(a) * b, with silu(a) = a * sigmoid(a).

Reads top to bottom: Triton forward and backward kernels (the backward recomputes sigmoid(a) from a
instead of storing silu(a)), their launchers, the torch op `storyllama::swiglu` /
`storyllama::swiglu_bwd` with autograd and fake implementations, and the plain PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storyllama.kernels._triton_utils import next_pow2, tl, triton, use_triton, warps_for

# Elements per program tile; columns at most 1024 wide so a row of any width is split across programs.
TILE = 4096
MAX_BLOCK_F = 1024


@triton.jit
def _swiglu_fwd_kernel(
    A,  # (M, F) gate input, any strides (e.g. one half of a fused w1|w3 projection)
    B,  # (M, F) up input, any strides
    Y,  # (M, F) out, contiguous, promote(a, b) dtype
    M,
    F,
    stride_am,
    stride_af,
    stride_bm,
    stride_bf,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]  # (BLOCK_M, 1)
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]  # (1, BLOCK_F)
    mask = (rows < M) & (cols < F)
    a = tl.load(A + rows * stride_am + cols * stride_af, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows * stride_bm + cols * stride_bf, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b  # fp32, rounded once on the store
    tl.store(Y + rows * F + cols, y.to(Y.dtype.element_ty), mask=mask)


# Backward. With s = sigmoid(a), silu(a) = a * s and ds/da = s * (1 - s):
#   d silu / da = s + a * s * (1 - s) = s * (1 + a * (1 - s))
#   da = dy * b * s * (1 + a * (1 - s))
#   db = dy * a * s
# s is recomputed from a (one sigmoid per element) rather than saved: that keeps activation memory at
# the two inputs the forward already had.
@triton.jit
def _swiglu_bwd_kernel(
    DY,  # (M, F) upstream gradient, any strides
    A,  # (M, F) forward gate input, any strides
    B,  # (M, F) forward up input, any strides
    DA,  # (M, F) out, contiguous, a's dtype
    DB,  # (M, F) out, contiguous, b's dtype
    M,
    F,
    stride_dym,
    stride_dyf,
    stride_am,
    stride_af,
    stride_bm,
    stride_bf,
    BLOCK_M: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]  # (BLOCK_M, 1)
    cols = (tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F))[None, :]  # (1, BLOCK_F)
    mask = (rows < M) & (cols < F)
    dy = tl.load(DY + rows * stride_dym + cols * stride_dyf, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + rows * stride_am + cols * stride_af, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + rows * stride_bm + cols * stride_bf, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    da = dy * b * s * (1.0 + a * (1.0 - s))
    db = dy * a * s
    tl.store(DA + rows * F + cols, da.to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + rows * F + cols, db.to(DB.dtype.element_ty), mask=mask)


def _blocks(M: int, F: int) -> tuple[int, int]:
    block_f = min(next_pow2(F), MAX_BLOCK_F)
    block_m = max(1, min(next_pow2(M), TILE // block_f))
    return block_m, block_f


def swiglu_fwd_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (..., F) -> silu(a) * b (..., F), contiguous."""
    F_ = a.shape[-1]
    a2, b2 = a.reshape(-1, F_), b.reshape(-1, F_)  # (M, F): views when the leading dims allow it
    M = a2.shape[0]
    y = torch.empty((M, F_), dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    if y.numel():
        block_m, block_f = _blocks(M, F_)
        _swiglu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(F_, block_f))](
            a2, b2, y, M, F_, *a2.stride(), *b2.stride(),
            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps_for(block_m * block_f),
        )  # fmt: skip
    return y.view(a.shape)


def swiglu_bwd_triton(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> da, db (..., F), contiguous, in a's and b's dtypes."""
    F_ = a.shape[-1]
    dy2, a2, b2 = dy.reshape(-1, F_), a.reshape(-1, F_), b.reshape(-1, F_)  # (M, F) each
    M = a2.shape[0]
    da = torch.empty((M, F_), dtype=a.dtype, device=a.device)
    db = torch.empty((M, F_), dtype=b.dtype, device=b.device)
    if da.numel():
        block_m, block_f = _blocks(M, F_)
        _swiglu_bwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(F_, block_f))](
            dy2, a2, b2, da, db, M, F_, *dy2.stride(), *a2.stride(), *b2.stride(),
            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps_for(block_m * block_f),
        )  # fmt: skip
    return da.view(a.shape), db.view(b.shape)


# ---- torch op: Triton where eligible, the reference elsewhere; autograd and fake registered ----


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"swiglu: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


@torch.library.custom_op("storyllama::swiglu", mutates_args=())
def swiglu_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b)
    if use_triton("swiglu", a, b):
        return swiglu_fwd_triton(a, b)
    return swiglu_reference(a, b).contiguous()


@swiglu_op.register_fake
def _(a, b):
    _check(a, b)
    return a.new_empty(a.shape, dtype=torch.promote_types(a.dtype, b.dtype))


@torch.library.custom_op("storyllama::swiglu_bwd", mutates_args=())
def swiglu_bwd_op(dy: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton("swiglu", a, b):
        return swiglu_bwd_triton(dy, a, b)
    # The kernel's formula in torch ops (autograd is off inside an op's implementation).
    ct = torch.promote_types(a.dtype, torch.float32)  # fp64 kept
    dyf, af, bf = dy.to(ct), a.to(ct), b.to(ct)
    s = torch.sigmoid(af)
    da = dyf * bf * s * (1 + af * (1 - s))
    return da.to(a.dtype).contiguous(), (dyf * af * s).to(b.dtype).contiguous()


@swiglu_bwd_op.register_fake
def _(dy, a, b):
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # a, b: the recompute needs nothing else


def _backward(ctx, dy):
    a, b = ctx.saved_tensors
    return swiglu_bwd_op(dy, a, b)


swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate as a torch op: a, b (..., F) -> silu(a) * b (..., F)."""
    return swiglu_op(a, b)


# ---- plain PyTorch reference ----


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b
