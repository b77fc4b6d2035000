"""Rotary position embedding, half-split layout (the one Hugging Face Llama uses).

With x1 = x[..., :D/2], x2 = x[..., D/2:] and angles theta_i * pos:
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

Reads top to bottom: one Triton kernel (the backward is the same rotation by -angle), its launcher,
the torch op `storyllama::rope` / `storyllama::rope_bwd` with autograd and fake implementations, the
cos/sin helper and the plain PyTorch reference.
"""

from __future__ import annotations

import torch

from storyllama.kernels._triton_utils import next_pow2, tl, triton, use_triton, warps_for

# Elements per half-tile: (BLOCK_T, BLOCK_H, BLOCK_D) covers several positions of all heads, so a
# (H=8, D=64) head layout still moves ~8 KiB in and out per program in bf16.
TILE = 2048


# Forward and backward in one kernel. The forward is y = R(angle) x per (x1_i, x2_i) pair with
# R = [[cos, -sin], [sin, cos]]; R is orthogonal, so dx = R^T dy = R(-angle) dy: the same kernel with
# sin negated (SIGN=-1). cos/sin get no gradient (they are fixed tables, not parameters).
@triton.jit
def _rope_kernel(
    X,  # (B, T, H, D) input (q or k; dy in the backward), any strides
    COS,  # (B or 1, T, D/2) fp32; stride_cb = 0 reuses one table for every batch row
    SIN,  # (B or 1, T, D/2) fp32, same strides as COS
    Y,  # (B, T, H, D) out, contiguous, x's dtype
    T,
    H,
    D2,  # D / 2
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_cb,
    stride_ct,
    stride_cd,
    SIGN: tl.constexpr,  # +1: rotate by +angle (forward); -1: by -angle (backward)
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # (BLOCK_T,)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    t3, h3, d3 = t[:, None, None], h[None, :, None], d[None, None, :]  # broadcast to (BLOCK_T, BLOCK_H, BLOCK_D)
    mask = (t3 < T) & (h3 < H) & (d3 < D2)
    x_ptr = X + b * stride_xb + t3 * stride_xt + h3 * stride_xh + d3 * stride_xd
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + D2 * stride_xd, mask=mask, other=0.0).to(tl.float32)
    cs_mask = (t[:, None] < T) & (d[None, :] < D2)
    cs_off = b * stride_cb + t[:, None] * stride_ct + d[None, :] * stride_cd  # (BLOCK_T, BLOCK_D)
    c = tl.load(COS + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]  # shared by all heads
    s = tl.load(SIN + cs_off, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :] * SIGN
    y_ptr = Y + ((b * T + t3) * H + h3) * (2 * D2) + d3
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + D2, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """x (B, T, H, D) any strides; cos, sin (B or 1, T, D/2) -> y (B, T, H, D) contiguous. sign=-1 undoes it."""
    B, T, H, D = x.shape
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h, block_d = next_pow2(H), next_pow2(D // 2)
    block_t = max(1, min(next_pow2(T), TILE // (block_h * block_d)))
    _rope_kernel[(triton.cdiv(T, block_t), B)](
        x, cos, sin, y, T, H, D // 2, *x.stride(),
        0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2),
        SIGN=sign, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps_for(block_t * block_h * block_d),
    )  # fmt: skip
    return y


# ---- torch op: Triton where eligible, the reference elsewhere; autograd and fake registered ----


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    B, T, H, D = x.shape
    if D % 2 or cos.shape != sin.shape or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (T, D // 2):
        raise ValueError(f"rope: x {tuple(x.shape)} needs even D and cos/sin of shape (1 or {B}, {T}, {D // 2}), "
                         f"got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")  # fmt: skip


@torch.library.custom_op("storyllama::rope", mutates_args=())
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _check(x, cos, sin)
    if use_triton("rope", x):
        return rope_triton(x, cos, sin, 1)
    return rope_reference(x, cos, sin).contiguous()


@rope_op.register_fake
def _(x, cos, sin):
    _check(x, cos, sin)
    return x.new_empty(x.shape)


@torch.library.custom_op("storyllama::rope_bwd", mutates_args=())
def rope_bwd_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton("rope", dy):
        return rope_triton(dy, cos, sin, -1)
    return rope_reference(dy, cos, -sin).contiguous()  # rotation by -angle


@rope_bwd_op.register_fake
def _(dy, cos, sin):
    return dy.new_empty(dy.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return rope_bwd_op(dy, cos, sin), None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as a torch op: x (B, T, H, D); cos, sin (B or 1, T, D/2) fp32 -> (B, T, H, D) in x's dtype."""
    return rope_op(x, cos, sin)


# ---- cos/sin tables and the plain PyTorch reference ----


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin in fp32 for integer positions of shape (B, T) -> each (B, T, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos(), angles.sin()


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B or 1, T, D/2) fp32. Computed in fp32 (fp64 stays fp64), returned in x's dtype."""
    d2 = x.shape[-1] // 2
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2): broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
