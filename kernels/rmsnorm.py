"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

Reads top to bottom: Triton forward and backward kernels, their launchers, the torch op
`storyllama::rmsnorm_fwd` / `storyllama::rmsnorm_bwd` with its autograd and fake implementations,
and the plain PyTorch reference. As in Llama (and `rmsnorm_reference`), the normalised value is cast
back to x's dtype before the weight, so the output dtype is promote(x.dtype, weight.dtype).
"""

from __future__ import annotations

import torch

from storyllama.kernels._triton_utils import next_pow2, persistent_programs, tl, triton, use_triton, warps_for

# One row lives in one tile: 32k columns of fp32 is 128 KiB of registers across the program. Wider rows
# are not a Llama's shape; they take the reference.
MAX_C = 32768
# Elements per program tile: several short rows per program, so C=512 still moves ~16 KiB per program.
TILE = 4096


@triton.jit
def _rmsnorm_fwd_kernel(
    X,  # (M, C) input rows, any strides
    W,  # (C,) weight, contiguous
    Y,  # (M, C) output, contiguous, dtype promote(x, w)
    RSTD,  # (M,) fp32 out: 1 / sqrt(mean(x^2) + eps), kept for the backward
    M,
    C,
    stride_xm,
    stride_xc,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M*C may pass 2^31
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)  # (BLOCK_M,), rstd kept in fp32
    n = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)  # cast to x's dtype, as the reference does
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * C + cols[None, :], (n * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


# Backward. With n = x * rstd, rstd = (mean(x^2) + eps)^(-1/2), y = n * w and dn = dy * w:
#   d rstd / d x_j = -rstd^3 * x_j / C
#   dx_j = rstd * dn_j + sum_i dn_i * x_i * (-rstd^3 * x_j / C)
#        = rstd * (dn_j - n_j * mean_i(dn_i * n_i))
#   dw_j = sum over rows of dy_j * n_j       (n as cast to x's dtype, like the forward)
# dw is a reduction over all rows: each program sums its own stretch of rows into an fp32 partial
# row, and the launcher adds the (programs, C) partials.
@triton.jit
def _rmsnorm_bwd_kernel(
    DY,  # (M, C) upstream gradient, any strides
    X,  # (M, C) forward input, any strides
    W,  # (C,) weight, contiguous
    RSTD,  # (M,) fp32 from the forward
    DX,  # (M, C) out, contiguous, x's dtype
    DW_PARTIAL,  # (programs, C) fp32 out: this program's share of dw
    M,
    C,
    stride_dym,
    stride_dyc,
    stride_xm,
    stride_xc,
    rows_per_program,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        n = x * rstd[:, None]
        dn = dy * w[None, :]
        mean_dn_n = tl.sum(dn * n, axis=1) / C  # (BLOCK_M,)
        dx = rstd[:, None] * (dn - n * mean_dn_n[:, None])
        tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTIAL + pid * C + cols, tl.sum(dw, axis=0), mask=cmask)


def _blocks(M: int, C: int) -> tuple[int, int]:
    block_c = next_pow2(C)
    block_m = max(1, min(next_pow2(M), TILE // block_c))
    return block_m, block_c


def rmsnorm_fwd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C), weight (C,) -> y (..., C) in promote(x, w) dtype, rstd (...) fp32."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (M, C): a view when the leading dims allow it, else a copy
    M = x2.shape[0]
    y = torch.empty((M, C), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M > 0:
        block_m, block_c = _blocks(M, C)
        _rmsnorm_fwd_kernel[(triton.cdiv(M, block_m),)](
            x2, weight.contiguous(), y, rstd, M, C, x2.stride(0), x2.stride(1), eps,
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps_for(block_m * block_c),
        )  # fmt: skip
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rmsnorm_bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (..., C) in x's dtype, dweight (C,) in weight's dtype (summed in fp32)."""
    C = x.shape[-1]
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)  # (M, C) each
    M = x2.shape[0]
    dx = torch.empty((M, C), dtype=x.dtype, device=x.device)
    if M == 0:
        return dx.view(x.shape), torch.zeros_like(weight)
    block_m, block_c = _blocks(M, C)
    programs = persistent_programs(x.device, triton.cdiv(M, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, x2, weight.contiguous(), rstd.reshape(-1).contiguous(), dx, dw_partial, M, C,
        dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), rows_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps_for(block_m * block_c),
    )  # fmt: skip
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


# ---- torch op: Triton where eligible, the reference elsewhere; autograd and fake registered ----


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 for fp32/bf16/fp16 (rstd in fp32), fp64 kept


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return use_triton("rmsnorm", x, weight) and x.shape[-1] <= MAX_C


@torch.library.custom_op("storyllama::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _eligible(x, weight):
        return rmsnorm_fwd_triton(x, weight, eps)
    rstd = torch.rsqrt(x.to(_compute_dtype(x)).pow(2).mean(-1) + eps)
    return rmsnorm_reference(x, weight, eps).contiguous(), rstd.contiguous()


@rmsnorm_fwd_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), x.new_empty(
        x.shape[:-1], dtype=torch.float32
    )


@torch.library.custom_op("storyllama::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _eligible(x, weight):
        return rmsnorm_bwd_triton(dy, x, weight, rstd)
    # The kernel's formula in torch ops (autograd is off inside an op's implementation).
    ct = _compute_dtype(x)
    xf, dyf = x.to(ct), dy.to(ct)
    n = xf * rstd[..., None]  # (..., C)
    dn = dyf * weight.to(ct)
    dx = rstd[..., None] * (dn - n * (dn * n).mean(-1, keepdim=True))
    dw = (dyf * n.to(x.dtype).to(ct)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype).contiguous(), dw.to(weight.dtype)


@rmsnorm_bwd_op.register_fake
def _(dy, x, weight, rstd, eps):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.eps = eps


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rmsnorm_bwd_op(dy, x, weight, rstd, ctx.eps)
    return dx, dw, None


rmsnorm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as a torch op: x (..., C), weight (C,) -> y (..., C). Same math as `rmsnorm_reference`."""
    return rmsnorm_fwd_op(x, weight, eps)[0]


# ---- plain PyTorch reference ----


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 (rstd in fp32; fp64 stays fp64), cast back to the input dtype before the weight, as
    # Llama does.
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight
