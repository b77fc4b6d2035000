"""Fused linear + cross-entropy: loss = CE(x @ weight.T, targets), never holding the (N, V) logits.

Rows are taken in chunks. Per chunk: logits = x_chunk @ W.T (a torch matmul), then one pass turns the
logits into the row losses and, in place, into dloss/dlogits; grad_x_chunk = dlogits @ W and
grad_W += dlogits.T @ x_chunk follow at once. So the forward also computes the gradients; they are
kept and the backward only scales them by the incoming gradient. Peak extra memory is one chunk of
logits (by default about the size of W) plus the fp32 grad_W accumulator, instead of several (N, V)
buffers.

Reads top to bottom: the Triton loss/gradient kernel and its launcher, the same step in torch ops, the
chunk loop, the torch op `storyllama::linear_cross_entropy` with autograd and fake implementations
(its `allow_triton` argument picks the Triton step where eligible, or the torch step: the CPU path),
and the plain unfused reference.

Reductions: "mean" divides by the number of non-ignored targets in this call (NaN when there are none,
as F.cross_entropy); "sum" does not divide. Under gradient accumulation with varying numbers of
ignored targets per micro-batch, the exact token mean is sum-reduced losses divided by the total count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from storyllama.kernels._triton_utils import next_pow2, tl, triton, use_triton, warps_for

# Vocabulary block per loop step: 4k fp32 values in flight per program (16 per thread at 8 warps).
MAX_BLOCK_V = 4096
# Elements per program tile: small vocabularies take several rows per program (BLOCK_N > 1); at the
# 50k GPT-2 vocabulary a program owns one row and walks it in 4k blocks.
TILE = 4096


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS,  # (n, V) this chunk's logits, row stride stride_row; overwritten with dloss/dlogits if WRITE_GRAD
    TARGETS,  # (n,) class ids; ignore_index rows add no loss and get a zero gradient row
    LOSS,  # (n,) fp32 out: logsumexp(z) - z[target], 0 for ignored rows
    SCALE,  # () fp32: factor on every gradient (1 / non-ignored count for "mean", 1 for "sum")
    n,
    V,
    stride_row,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Loss: l = lse - z_t with lse = log(sum_j exp(z_j)), computed online in one pass over V blocks
    # (running max m and running sum d, rescaled by exp(m_old - m_new) when the max grows), all in fp32.
    # Gradient: dl/dz_j = exp(z_j - lse) - [j == t] = softmax_j - onehot_j, times SCALE; a second pass.
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,)
    rmask = rows < n
    # Padding rows (rows >= n) re-read the last real row, so every value stays finite; stores are masked.
    row_ptr = LOGITS + tl.minimum(rows, n - 1)[:, None] * stride_row  # (BLOCK_N, 1)
    target = tl.load(TARGETS + rows, mask=rmask, other=ignore_index)
    valid = (target != ignore_index) & rmask
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    d = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols[None, :], mask=(cols < V)[None, :], other=float("-inf"))
        z = z.to(tl.float32)  # (BLOCK_N, BLOCK_V)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every block holds at least one real column
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(d)  # (BLOCK_N,)
    z_target = tl.load(LOGITS + rows * stride_row + tl.where(valid, target, 0), mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + rows, tl.where(valid, lse - z_target, 0.0), mask=rmask)  # z_target read before pass 2
    if WRITE_GRAD:
        scale = tl.load(SCALE) * valid.to(tl.float32)  # (BLOCK_N,): ignored rows get an all-zero row
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols < V)[None, :]
            z = tl.load(row_ptr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            tl.store(row_ptr + cols[None, :], (g * scale[:, None]).to(LOGITS.dtype.element_ty), mask=mask)


def ce_loss_grad_triton_(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int, write_grad: bool = True
) -> torch.Tensor:
    """logits (n, V), unit column stride, overwritten with dloss/dlogits * scale; -> row losses (n,) fp32."""
    n, V = logits.shape
    assert logits.stride(1) == 1, "the chunk's logits must have contiguous rows"
    loss = torch.empty((n,), dtype=torch.float32, device=logits.device)
    if n:
        block_v = min(next_pow2(V), MAX_BLOCK_V)
        block_n = max(1, min(next_pow2(n), TILE // block_v))
        _ce_loss_grad_kernel[(triton.cdiv(n, block_n),)](
            logits, targets, loss, scale, n, V, logits.stride(0), ignore_index,
            WRITE_GRAD=write_grad, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps_for(block_n * block_v),
        )  # fmt: skip
    return loss


def ce_loss_grad_torch_(
    logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, ignore_index: int, write_grad: bool = True
) -> torch.Tensor:
    """The same step in torch ops (the CPU path), in place on fp32 logits with no second (n, V) buffer:
    shift by the row max, exp, normalise. -> row losses (n,) fp32."""
    z = logits if logits.dtype == torch.float32 else logits.float()  # (n, V) fp32
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)[:, None]  # (n, 1), safe index for ignored rows
    m = z.amax(dim=-1, keepdim=True)  # (n, 1)
    z.sub_(m)  # z - max: exp cannot overflow
    z_target = z.gather(1, t).squeeze(1)  # (n,), shifted like z
    z.exp_()
    total = z.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = torch.where(valid, total.squeeze(1).log() - z_target, 0.0)  # lse - z_t, the max cancels
    if write_grad:
        coef = (valid * scale)[:, None]  # (n, 1): SCALE, or 0 on ignored rows
        z.mul_(coef / total)  # softmax * coef
        z.scatter_add_(1, t, -coef)  # minus the one-hot target * coef
        if z is not logits:
            logits.copy_(z)
    return loss


# ---- the chunk loop shared by both ops ----


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (M, K) fp32 += a (M, n) @ b (n, K), the product never rounded to a and b's dtype.

    Under bf16 autocast, rounding each chunk's (V, C) product to bf16 before adding it would put a
    bf16 rounding error (2^-9 relative) of every chunk's partial sum into grad_w. CUDA: the bf16 matmul
    writes its fp32 accumulator out as fp32 (out_dtype), no bf16 rounding; elsewhere (CPU bf16: tests
    only, the CPU trainer runs fp32) the chunk is upcast and multiplied in fp32.
    """
    global _mm_out_dtype_ok
    if a.dtype == torch.float32:
        acc.addmm_(a, b)  # no temporary
        return
    if a.is_cuda and _mm_out_dtype_ok:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError, RuntimeError):  # a torch without mm(out_dtype=) for this dtype
            _mm_out_dtype_ok = False
    acc.addmm_(a.float(), b.float())


_mm_out_dtype_ok = True


def default_chunk_rows(C: int) -> int:
    """Rows per chunk: C rounded up to a multiple of 64, so a chunk's (rows, V) logits hold about as many
    elements as the (V, C) weight (peak extra memory ~ one weight), and the matmuls keep 64-row tiles."""
    return max(64, -(-C // 64) * 64)


def _chunked_loss_and_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    triton_step: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C), weight (V, C), targets (N,) -> loss () fp32, grad_x (N, C) in x's dtype, grad_w (V, C)
    in weight's dtype (both (0,) when not compute_grad). The matmuls run in x's dtype."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    N, C = x.shape
    w = weight.to(x.dtype)  # (V, C), a no-op unless x is bf16 and the weight fp32 (autocast)
    targets = targets.long()
    valid_count = (targets != ignore_index).sum()  # stays a tensor: no host sync
    # Scale on every gradient; clamp so an all-ignored batch gives zero gradients, not NaN.
    scale = (1.0 / valid_count.clamp(min=1)).float() if reduction == "mean" else x.new_ones((), dtype=torch.float32)
    loss = x.new_zeros((), dtype=torch.float32)
    grad_x = torch.empty((N, C) if compute_grad else (0,), dtype=x.dtype, device=x.device)
    # grad_w accumulated in fp32 over chunks whatever the matmul dtype.
    grad_w = torch.zeros(weight.shape if compute_grad else (0,), dtype=torch.float32, device=x.device)
    step = ce_loss_grad_triton_ if triton_step else ce_loss_grad_torch_
    rows = chunk_size if chunk_size > 0 else default_chunk_rows(C)
    for start in range(0, N, rows):
        x_c = x[start : start + rows]  # (n, C)
        logits = x_c @ w.T  # (n, V): the only vocabulary-sized buffer
        loss += step(logits, targets[start : start + rows], scale, ignore_index, compute_grad).sum()
        if compute_grad:
            dlogits = logits  # (n, V), overwritten in place by the step
            torch.mm(dlogits, w, out=grad_x[start : start + rows])  # (n, C)
            _addmm_fp32_(grad_w, dlogits.T, x_c)  # (V, C)
            del dlogits
        del logits  # free this chunk before the next one is allocated
    if reduction == "mean":
        loss = loss / valid_count  # NaN when every target is ignored, like F.cross_entropy
    return loss, grad_x, grad_w.to(weight.dtype)


# ---- torch ops: autograd scales the saved gradients; fake gives the shapes ----


def _fake(x, weight, targets, ignore_index, reduction, chunk_size, compute_grad, allow_triton):
    loss = x.new_empty((), dtype=torch.float32)
    if compute_grad:
        return loss, x.new_empty(x.shape), weight.new_empty(weight.shape)
    return loss, x.new_empty((0,)), weight.new_empty((0,))


def _setup_context(ctx, inputs, output):
    ctx.compute_grad = inputs[6]
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled (V, C) "gradient" for the grad_w output in backward


def _backward(ctx, dloss, _dgrad_x, _dgrad_w):
    if not ctx.compute_grad:
        raise RuntimeError("linear_cross_entropy ran without gradients (no_grad or no input needing grad)")
    grad_x, grad_w = ctx.saved_tensors
    if dloss is None:  # the loss itself was not used
        return (None,) * 8
    return grad_x * dloss, grad_w * dloss, None, None, None, None, None, None


@torch.library.custom_op("storyllama::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    allow_triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """allow_triton=False keeps the per-chunk step in torch ops (the CPU reference path)."""
    triton_step = allow_triton and use_triton("linear_cross_entropy", x, weight)
    return _chunked_loss_and_grads(x, weight, targets, ignore_index, reduction, chunk_size, compute_grad, triton_step)


linear_cross_entropy_op.register_fake(_fake)
linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def _call(allow_triton, x, weight, targets, ignore_index, reduction, chunk_size):
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # the matmuls in autocast's dtype, as F.linear would
    compute_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    x2 = x.reshape(-1, x.shape[-1])  # (N, C)
    return linear_cross_entropy_op(x2, weight, targets.reshape(-1), ignore_index, reduction, chunk_size or 0,
                                   compute_grad, allow_triton)[0]


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Fused linear + CE as a torch op, Triton loss/gradient step (torch step where Triton is not eligible).
    x (N, C) or (..., C), weight (V, C), targets (N,) or (...) -> loss () fp32."""
    return _call(True, x, weight, targets, ignore_index, reduction, chunk_size)


def linear_cross_entropy_chunked(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The same chunked fused linear + CE in torch ops only (CPU's `--fused_ce`). Same arguments."""
    return _call(False, x, weight, targets, ignore_index, reduction, chunk_size)


# ---- plain unfused reference ----


def linear_cross_entropy_reference(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    logits = F.linear(x, weight).float()  # (N, V), materialised in full
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
