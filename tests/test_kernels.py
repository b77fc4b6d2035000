"""The Triton kernels against their references computed in float64, forward and every gradient.

Without CUDA the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here
and in conftest.py before triton is imported); with CUDA the same tests run on the GPU. Shapes stay
small because the interpreter runs every program as a numpy loop.

Tolerances, per dtype of the kernel's inputs (the reference sees the same values upcast to float64):
- float32: atol = rtol = 1e-5. Forward errors are ~1e-7; gradients that sum over a row or over rows
  (rmsnorm dx and dweight, the cross-entropy's matmuls) reach ~1e-6.
- bfloat16: atol = rtol = 2e-2, about two bf16 ulps (2^-7 relative each): the output is rounded once
  to bf16 (the interpreter truncates rather than rounds), and rmsnorm also rounds its normalised value
  to x's dtype before the weight, as the reference does.
- A gradient that sums `terms` separately rounded values (rmsnorm's dweight sums dy * n over the rows,
  each n rounded to x's dtype) random-walks: atol grows to 4 * sqrt(terms) * 2^-8 for bf16 (four
  standard deviations of unit-scale terms each off by up to an ulp).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest.py does it too)

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import storyllama.kernels.cross_entropy as ce  # noqa: E402
from storyllama.kernels import ops as kernels  # noqa: E402
from storyllama.kernels._triton_utils import HAS_TRITON, interpreted  # noqa: E402
from storyllama.kernels.cross_entropy import (  # noqa: E402
    linear_cross_entropy,
    linear_cross_entropy_chunked,
    linear_cross_entropy_reference,
)
from storyllama.kernels.ops import REFERENCE, get_ops, resolve_backend  # noqa: E402
from storyllama.kernels.rmsnorm import rmsnorm, rmsnorm_bwd_triton, rmsnorm_fwd_triton, rmsnorm_reference  # noqa: E402
from storyllama.kernels.rope import rope, rope_cos_sin, rope_reference, rope_triton  # noqa: E402
from storyllama.kernels.swiglu import swiglu, swiglu_bwd_triton, swiglu_fwd_triton, swiglu_reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def gpu(f):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(f))


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of t's values that collects gradients: the reference's input."""
    return t.detach().double().requires_grad_()


def grads(out: torch.Tensor, inputs: list[torch.Tensor], dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, dy.to(out.dtype))


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, terms: int = 1) -> None:
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-24  # half an ulp at 1.0
    atol = max(TOL[dtype]["atol"], 4 * terms**0.5 * eps)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=TOL[dtype]["rtol"])


def noncontig(shape: tuple[int, ...], dtype: torch.dtype, how: str) -> torch.Tensor:
    """A tensor of `shape` laid out as asked: contiguous, every other column, or transposed storage."""
    if how == "contiguous":
        return torch.randn(shape, device=DEV, dtype=dtype)
    if how == "strided":  # last-dim stride 2
        return torch.randn((*shape[:-1], 2 * shape[-1]), device=DEV, dtype=dtype)[..., ::2]
    if how == "transposed":  # first two dims swapped in memory
        return torch.randn((shape[1], shape[0], *shape[2:]), device=DEV, dtype=dtype).transpose(0, 1)
    raise ValueError(how)


def test_triton_path_is_the_one_tested():
    """Off CUDA the kernels must be interpreted, or the ops would quietly take the reference."""
    assert CUDA or interpreted(), "TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py)"


# ---------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 512), (2, 7, 1000), (1, 3000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_rmsnorm(shape, dtype, layout):
    torch.manual_seed(0)
    C = shape[-1]
    x = noncontig(shape, dtype, layout).requires_grad_()
    w = (torch.rand(C, device=DEV, dtype=dtype) + 0.5).requires_grad_()
    y = rmsnorm(x, w, 1e-5)
    dy = noncontig(shape, dtype, "transposed" if len(shape) > 2 else "strided")  # a non-contiguous gradient
    dx, dw = grads(y, [x, w], dy)
    xr, wr = leaf(x), leaf(w)
    yr = rmsnorm_reference(xr, wr, 1e-5)
    dxr, dwr = grads(yr, [xr, wr], dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    close(y, yr, dtype)
    close(dx, dxr, dtype)
    close(dw, dwr, dtype, terms=x.numel() // C)


def test_rmsnorm_launchers_keep_rstd_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 37, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(37, device=DEV)  # fp32 weight with bf16 activations: output promotes to fp32
    y, rstd = rmsnorm_fwd_triton(x, w, 1e-6)
    assert rstd.dtype == torch.float32 and rstd.shape == (4,) and y.dtype == torch.float32
    torch.testing.assert_close(rstd.double(), x.double().pow(2).mean(-1).add(1e-6).rsqrt(), atol=1e-6, rtol=1e-6)
    dx, dw = rmsnorm_bwd_triton(torch.ones_like(y), x, w, rstd)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- RoPE


def _cos_sin(B: int, T: int, D: int, per_row: bool, sliced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if per_row:  # (B, T, D/2): e.g. left-padded prompts, each row its own positions
        pos = torch.randint(0, 4 * T, (B, T), device=DEV)
    else:
        pos = torch.arange(2 * T if sliced else T, device=DEV)[None]
    cos, sin = rope_cos_sin(pos, D, 10000.0)
    return (cos[:, :T], sin[:, :T]) if sliced else (cos, sin)  # sliced: a view of a longer table


@pytest.mark.parametrize(
    "shape, per_row, sliced",
    [((2, 37, 3, 24), False, True), ((1, 16, 4, 64), False, False), ((3, 9, 5, 10), True, False)],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "qkv", "strided"])
def test_rope(shape, per_row, sliced, dtype, layout):
    torch.manual_seed(0)
    B, T, H, D = shape
    if layout == "qkv":  # q as a view of a fused q|k|v projection: the time stride skips k and v
        x = torch.randn(B, T, 3 * H * D, device=DEV, dtype=dtype)[..., : H * D].view(B, T, H, D)
    else:
        x = noncontig(shape, dtype, layout)
    x.requires_grad_()
    cos, sin = _cos_sin(B, T, D, per_row, sliced)
    y = rope(x, cos, sin)
    dy = torch.randn(B, T, H, D, device=DEV, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    (dx,) = grads(y, [x], dy)
    xr = leaf(x)
    yr = rope_reference(xr, cos.double(), sin.double())
    (dxr,) = grads(yr, [xr], dy)
    assert y.dtype == dtype and dx.dtype == dtype
    close(y, yr, dtype)
    close(dx, dxr, dtype)


def test_rope_backward_undoes_the_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 3, 12, device=DEV)
    cos, sin = _cos_sin(2, 11, 12, per_row=True, sliced=False)
    torch.testing.assert_close(rope_triton(rope_triton(x, cos, sin, 1), cos, sin, -1), x, atol=1e-5, rtol=1e-5)


def test_rope_rejects_bad_tables():
    x = torch.randn(2, 5, 3, 8, device=DEV)
    cos, sin = _cos_sin(2, 5, 6, per_row=False, sliced=False)  # D/2 = 3, not 4
    with pytest.raises(ValueError, match="cos/sin of shape"):
        rope(x, cos, sin)


# ----------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 1000), (2, 3, 1500)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused", "transposed"])
def test_swiglu(shape, dtype, layout):
    torch.manual_seed(0)
    if layout == "fused":  # a, b = halves of one w1|w3 projection: row stride 2F
        a, b = torch.randn((*shape[:-1], 2 * shape[-1]), device=DEV, dtype=dtype).chunk(2, -1)
    else:
        a, b = noncontig(shape, dtype, layout), noncontig(shape, dtype, layout)
    a, b = a.requires_grad_(), b.requires_grad_()
    y = swiglu(3 * a if dtype == torch.float32 else a, b)  # 3a: reach the sigmoid's flat tails too
    dy = noncontig(shape, dtype, "strided")
    da, db = grads(y, [a, b], dy)
    ar, br = leaf(a), leaf(b)
    yr = swiglu_reference(3 * ar if dtype == torch.float32 else ar, br)
    dar, dbr = grads(yr, [ar, br], dy)
    assert y.dtype == dtype and da.dtype == dtype and db.dtype == dtype
    close(y, yr, dtype)
    close(da, dar, dtype)
    close(db, dbr, dtype)


def test_swiglu_launchers_match_the_formula():
    a, b, dy = (torch.linspace(-6, 6, 50, device=DEV).view(5, 10) * s for s in (1.0, 0.5, -2.0))
    s = torch.sigmoid(a)
    torch.testing.assert_close(swiglu_fwd_triton(a, b), a * s * b)
    da, db = swiglu_bwd_triton(dy, a, b)
    torch.testing.assert_close(da, dy * b * s * (1 + a * (1 - s)))
    torch.testing.assert_close(db, dy * a * s)


# ----------------------------------------------------------------------------- fused linear + cross-entropy

FUSED = {"triton": linear_cross_entropy, "chunked": linear_cross_entropy_chunked}


def ce_inputs(N=37, C=24, V=301, dtype=torch.float32, ignore_every=4, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(N, C, device=DEV, dtype=dtype, generator=g)
    w = (torch.randn(V, C, device=DEV, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    y[::ignore_every] = -100  # ignore_index rows
    return x, w, y


def ce_expected(x, w, y, reduction="mean"):
    xr, wr = leaf(x), leaf(w)
    loss = F.cross_entropy(xr @ wr.T, y, ignore_index=-100, reduction=reduction)  # float64 logits, unfused
    return (loss, *torch.autograd.grad(loss, [xr, wr]))


@pytest.mark.parametrize("impl", list(FUSED))
@pytest.mark.parametrize("chunk_size", [None, 1, 8, 13, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy(impl, chunk_size, reduction):
    x, w, y = ce_inputs()
    x.requires_grad_(), w.requires_grad_()
    loss = FUSED[impl](x, w, y, -100, reduction, chunk_size=chunk_size)
    dx, dw = torch.autograd.grad(2.5 * loss, [x, w])  # a non-unit upstream gradient
    loss_r, dx_r, dw_r = ce_expected(x, w, y, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    close(loss, loss_r, torch.float32)
    close(dx, 2.5 * dx_r, torch.float32)
    close(dw, 2.5 * dw_r, torch.float32)


@pytest.mark.parametrize("V, max_block_v", [(301, 64), (5000, ce.MAX_BLOCK_V)])
def test_linear_cross_entropy_online_softmax_over_many_blocks(monkeypatch, V, max_block_v):
    """Rows longer than one vocabulary block: the running max / running sum cross 5 blocks of 64 (many
    rows per program), or 2 blocks of 4096 (one row per program, as at the GPT-2 vocabulary)."""
    monkeypatch.setattr(ce, "MAX_BLOCK_V", max_block_v)
    x, w, y = ce_inputs(N=9, V=V)
    w = w * 8  # large logits: the running max must rescale the running sum, or exp overflows
    x.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(x, w, y)
    dx, dw = torch.autograd.grad(loss, [x, w])
    for a, e in zip((loss, dx, dw), ce_expected(x, w, y)):
        close(a, e, torch.float32)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-relative error: for gradients whose entries are all small (a mean over many tokens)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("impl", list(FUSED))
def test_linear_cross_entropy_bf16(impl):
    x, w, y = ce_inputs(dtype=torch.bfloat16)
    x.requires_grad_(), w.requires_grad_()
    loss = FUSED[impl](x, w, y, chunk_size=16)
    dx, dw = torch.autograd.grad(loss, [x, w])
    loss_r, dx_r, dw_r = ce_expected(x, w, y)
    assert dx.dtype == dw.dtype == torch.bfloat16
    close(loss, loss_r, torch.bfloat16)
    # bf16 logits and bf16 dlogits: each entry off by about an ulp (2^-8 relative), so ~1e-2 in norm at most.
    assert rel_err(dx, dx_r) < 1e-2 and rel_err(dw, dw_r) < 1e-2


@pytest.mark.parametrize("impl", list(FUSED))
def test_linear_cross_entropy_under_autocast(impl):
    """fp32 hidden states and weight under bf16 autocast: the matmuls in bf16, as F.linear would, and the
    gradients back in fp32; also through torch.compile."""
    x, w, y = ce_inputs()
    x.requires_grad_(), w.requires_grad_()

    def loss_fn(x, w, y):
        with torch.autocast(DEV.type, torch.bfloat16):
            return FUSED[impl](x, w, y)

    with torch.autocast(DEV.type, torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w).float(), y)
    dx_r, dw_r = torch.autograd.grad(ref, [x, w])
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        loss = fn(x, w, y)
        dx, dw = torch.autograd.grad(loss, [x, w])
        assert dx.dtype == dw.dtype == torch.float32
        close(loss, ref, torch.bfloat16)
        assert rel_err(dx, dx_r) < 1e-2 and rel_err(dw, dw_r) < 1e-2


@pytest.mark.parametrize("impl", [
    "chunked",
    # Triton's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest): the stored dlogits
    # then carry a one-signed bias of their own (~3e-3 here), so the Triton step is checked on CUDA only.
    pytest.param("triton", marks=pytest.mark.skipif(not CUDA, reason="interpreter's bf16 cast truncates")),
])
def test_linear_cross_entropy_autocast_weight_grad_summed_in_fp32(impl):
    """Under bf16 autocast grad_w is a sum over chunks; each chunk's (V, C) product must reach the fp32
    accumulator unrounded. Positive x makes every chunk's partial sums add up with one sign, so a bf16
    rounding of each partial sum (2^-9 relative) shows: about 1e-3 of the largest entry (measured 1.05e-3
    before the fix, 1.3e-4 after, against float64 math on the same bf16-rounded inputs)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    N, C, V = 2048, 32, 256
    x = (torch.rand(N, C, device=DEV, generator=g) + 0.5).requires_grad_()
    w = (torch.randn(V, C, device=DEV, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    with torch.autocast(DEV.type, torch.bfloat16):
        loss = FUSED[impl](x, w, y, chunk_size=256)  # 8 chunks
    dx, dw = torch.autograd.grad(loss, [x, w])
    _, dx_r, dw_r = ce_expected(x.detach().bfloat16(), w.detach().bfloat16(), y)

    def max_rel(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    assert max_rel(dw, dw_r) < 4e-4
    assert max_rel(dx, dx_r) < 1e-2  # one bf16 rounding of the (N, C) product: about 2^-8 at most


@pytest.mark.parametrize("impl", list(FUSED))
def test_linear_cross_entropy_gradient_accumulation(impl):
    """Two micro-batches: sums add up to the whole; means weighted by their token counts do too."""
    x, w, y = ce_inputs(N=40)
    y[:20:3] = -100  # the halves hold different numbers of ignored targets
    fn = FUSED[impl]
    x.requires_grad_(), w.requires_grad_()
    whole_sum, whole_mean = fn(x, w, y, reduction="sum"), fn(x, w, y, reduction="mean")
    dw_whole = torch.autograd.grad(whole_mean, [w])[0]
    halves = [(x[:20], y[:20]), (x[20:], y[20:])]
    total = sum(int((t != -100).sum()) for _, t in halves)
    sums = [fn(xh, w, yh, reduction="sum", chunk_size=7) for xh, yh in halves]
    torch.testing.assert_close(sums[0] + sums[1], whole_sum)
    # Mean under accumulation: each micro-batch's mean weighted by its share of the tokens.
    w.grad = None
    weighted = 0.0
    for xh, yh in halves:
        n = int((yh != -100).sum())
        part = fn(xh, w, yh, reduction="mean", chunk_size=7) * (n / total)
        part.backward()  # accumulates into w.grad as a training loop would
        weighted = weighted + part.detach()
    torch.testing.assert_close(weighted, whole_mean.detach())
    torch.testing.assert_close(w.grad, dw_whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", list(FUSED))
def test_linear_cross_entropy_all_ignored_and_no_grad(impl):
    x, w, y = ce_inputs(N=6)
    x.requires_grad_(), w.requires_grad_()
    none = torch.full_like(y, -100)
    assert torch.isnan(FUSED[impl](x, w, none)).item()  # mean over no targets, as F.cross_entropy
    s = FUSED[impl](x, w, none, reduction="sum")
    assert s.item() == 0.0
    assert not torch.autograd.grad(s, [x, w])[1].any()
    with torch.no_grad():  # loss only: no gradients computed or kept
        torch.testing.assert_close(FUSED[impl](x, w, y), linear_cross_entropy_reference(x, w, y))
    with pytest.raises(ValueError, match="reduction"):
        FUSED[impl](x, w, y, reduction="none")


def test_reference_backend_uses_the_chunked_loss():
    x, w, y = ce_inputs()
    assert REFERENCE.linear_cross_entropy is linear_cross_entropy_chunked
    torch.testing.assert_close(REFERENCE.linear_cross_entropy(x, w, y), linear_cross_entropy_reference(x, w, y))


# ------------------------------------------------------------ the ops' fallback (CPU without the interpreter)


def test_ops_fall_back_to_the_reference(monkeypatch):
    """With Triton ineligible (as on CPU without TRITON_INTERPRET) the ops give the reference's values."""
    for mod in ("rmsnorm", "rope", "swiglu", "cross_entropy"):
        monkeypatch.setattr(f"storyllama.kernels.{mod}.use_triton", lambda *a: False)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, device=DEV, requires_grad=True)
    w = torch.rand(8, device=DEV, requires_grad=True)
    cos, sin = _cos_sin(2, 5, 8, per_row=False, sliced=False)
    for op, ref, args in [
        (rmsnorm, rmsnorm_reference, (x, w, 1e-5)),
        (rope, rope_reference, (x, cos, sin)),
        (swiglu, swiglu_reference, (x, x.flip(-1))),
    ]:
        out, expected = op(*args), ref(*args)
        torch.testing.assert_close(out, expected)
        dy = torch.randn_like(out)
        diff = [a for a in (x, w) if any(a is b for b in args)]
        for g, ge in zip(torch.autograd.grad(out, diff, dy), torch.autograd.grad(expected, diff, dy)):
            torch.testing.assert_close(g, ge)
    xs, ws, ys = ce_inputs()
    torch.testing.assert_close(linear_cross_entropy(xs, ws, ys), linear_cross_entropy_reference(xs, ws, ys))


def test_backend_switch():
    assert resolve_backend("auto", "cpu") == "reference"
    assert get_ops("reference") is REFERENCE
    assert get_ops("triton").rmsnorm is rmsnorm
    with pytest.raises(ValueError, match="--kernels"):
        resolve_backend("fast", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("triton", "cpu")


# ---------------------------------------------------------------------------------------- torch.compile


class TinyBlock(torch.nn.Module):
    """All four ops in one small graph: norm -> rope -> fused SwiGLU MLP -> residual -> fused loss."""

    def __init__(self, ops: kernels.KernelOps, C: int = 24, H: int = 3, F_: int = 40, V: int = 37):
        super().__init__()
        self.ops, self.H = ops, H
        self.norm = torch.nn.Parameter(torch.rand(C) + 0.5)
        self.w13 = torch.nn.Linear(C, 2 * F_, bias=False)
        self.w2 = torch.nn.Linear(F_, C, bias=False)
        self.head = torch.nn.Parameter(torch.randn(V, C) * 0.2)

    def forward(self, x, cos, sin, targets):
        B, T, C = x.shape
        h = self.ops.rmsnorm(x, self.norm, 1e-5)  # (B, T, C)
        h = self.ops.rope(h.view(B, T, self.H, C // self.H), cos, sin).view(B, T, C)  # via (B, T, H, D)
        a, b = self.w13(h).chunk(2, dim=-1)  # (B, T, F) each, non-contiguous
        h = x + self.w2(self.ops.swiglu(a, b))
        return self.ops.linear_cross_entropy(h.view(B * T, C), self.head, targets.view(-1), -100, "mean")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_gives_the_eager_values(backend):
    torch.manual_seed(0)
    model = TinyBlock(get_ops(backend)).to(DEV)
    x = torch.randn(2, 6, 24, device=DEV)
    cos, sin = _cos_sin(2, 6, 8, per_row=False, sliced=False)
    y = torch.randint(0, 37, (2, 6), device=DEV)
    y[0, :2] = -100

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn(x, cos, sin, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(model)
    ref = loss_and_grads(_with_ops(model))
    torch._dynamo.reset()
    compiled = loss_and_grads(torch.compile(model, fullgraph=True))  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)  # and the ops agree with the unfused math


def _with_ops(model: TinyBlock) -> TinyBlock:
    """The same module seen through the plain references (unfused loss)."""
    plain = kernels.KernelOps("plain", rmsnorm_reference, rope_reference, swiglu_reference,
                              linear_cross_entropy_reference)  # fmt: skip
    other = TinyBlock.__new__(TinyBlock)
    other.__dict__.update(model.__dict__)
    other.ops = plain
    return other


# --------------------------------------------------------------------------------- convergence (the model)


def test_small_model_trains_the_same_with_the_ops():
    """30 AdamW steps of a small Llama: Triton ops + fused loss against references + unfused loss."""
    model_mod = pytest.importorskip("storyllama.model")
    from storyllama.config import ModelConfig

    # One layer, short sequences: the interpreter pays per kernel launch (~10 ms), not per element.
    cfg = ModelConfig(vocab_size=97, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, block_size=32, hidden_dim=72)
    torch.manual_seed(0)
    fast = model_mod.Llama(cfg, kernels="triton", fused_ce=True).to(DEV)
    plain = model_mod.Llama(cfg, kernels="reference", fused_ce=False).to(DEV)
    plain.load_state_dict(fast.state_dict())
    data = torch.randint(0, 97, (4, 2, 25), device=DEV)  # 4 fixed batches of (2, 25) tokens
    curves = []
    for model in (fast, plain):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(30):
            batch = data[step % 4]
            loss = model(batch[:, :-1], batch[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0] - 0.5  # it learns
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------------------- GPU: real shapes, bf16


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_ops_at_storyllama_88m_shapes(dtype):
    torch.manual_seed(0)
    B, T, C, H, D, Fh = 8, 512, 512, 8, 64, 1536
    x = torch.randn(B, T, C, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.rand(C, device="cuda", dtype=dtype, requires_grad=True)
    y = rmsnorm(x, w, 1e-5)
    xr, wr = leaf(x), leaf(w)
    yr = rmsnorm_reference(xr, wr, 1e-5)
    dy = torch.randn_like(y)
    close(y, yr, dtype)
    (dx, dw), (dxr, dwr) = grads(y, [x, w], dy), grads(yr, [xr, wr], dy)
    close(dx, dxr, dtype)
    close(dw, dwr, dtype, terms=B * T)

    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda")[None], D, 10000.0)
    yq, qr = rope(q, cos, sin), leaf(q)
    yqr = rope_reference(qr, cos.double(), sin.double())
    close(yq, yqr, dtype)
    close(grads(yq, [q], yq.detach())[0], grads(yqr, [qr], yq.detach())[0], dtype)

    a = torch.randn(B, T, Fh, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(B, T, Fh, device="cuda", dtype=dtype, requires_grad=True)
    ys, ar, br = swiglu(a, b), leaf(a), leaf(b)
    ysr = swiglu_reference(ar, br)
    close(ys, ysr, dtype)
    for g, gr in zip(grads(ys, [a, b], ys.detach()), grads(ysr, [ar, br], ys.detach())):
        close(g, gr, dtype)


@gpu
def test_gpu_fused_cross_entropy_at_the_88m_head():
    torch.manual_seed(0)
    N, C, V = 8192, 512, 50304
    x = torch.randn(N, C, device="cuda", requires_grad=True)
    w = (torch.randn(V, C, device="cuda") * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    y[::7] = -100
    with torch.autocast("cuda", torch.bfloat16):
        loss = linear_cross_entropy(x, w, y)
        ref = F.cross_entropy(F.linear(x, w).float(), y)
    dx, dw = torch.autograd.grad(loss, [x, w])
    dxr, dwr = torch.autograd.grad(ref, [x, w])
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-3)
    assert rel_err(dx, dxr) < 1e-2 and rel_err(dw, dwr) < 1e-2  # both from bf16 logits; entries ~1e-6


@gpu
def test_gpu_compiled_model_with_triton_ops():
    model_mod = pytest.importorskip("storyllama.model")
    from storyllama.config import preset

    torch.manual_seed(0)
    cfg = preset("storyllama-88m", dropout=0.0)
    fast = model_mod.Llama(cfg, kernels="triton", fused_ce=True).cuda()
    plain = model_mod.Llama(cfg, kernels="reference", fused_ce=False).cuda()
    plain.load_state_dict(fast.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (4, 257), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.compile(fast, fullgraph=True)(idx[:, :-1], idx[:, 1:])
        ref = plain(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
