"""Kernel benchmarks: fused linear + cross-entropy memory on CPU; per-kernel speed and training MFU on CUDA.

CPU (always): peak memory of loss + backward at the storyllama-88m head (2,048 tokens, dim 512,
vocabulary 50,304, fp32), the chunked fused loss against unfused `F.cross_entropy(x @ W.T, y)`, each in
a fresh process. How it is measured: the child process builds the inputs, warms the libraries up at a
small size, then resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`)
and reports VmHWM - VmRSS(before) after one loss + backward. That is the extra physical memory the
step needed (logits, softmax buffers, gradients), counted by the OS, whatever allocator made it.
(PyTorch's CPU allocator keeps no statistics, and ru_maxrss cannot be reset; if clear_refs cannot be
written, the child falls back to ru_maxrss and says so.)

CUDA (marked gpu): forward + backward time per kernel (bf16, storyllama-88m shapes at 16 x 512 tokens)
and GB/s of the minimal traffic, for eager PyTorch, `torch.compile` of the reference and the Triton op;
the fused cross-entropy's time, TFLOP/s and peak memory; storyllama-88m training tokens/s and MFU with
the kernels on and off.

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only   (or bin/bench -k kernels)
    python benchmarks/test_bench_kernels.py gpu                          (the CUDA table, no pytest needed)
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # script mode: `python benchmarks/test_bench_kernels.py ...`

CUDA = torch.cuda.is_available()
HEAD = dict(N=2048, C=512, V=50304)  # the storyllama-88m LM head at 4 x 512 tokens

# ----------------------------------------------------------------------- CPU: cross-entropy peak memory


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MB
    raise KeyError(field)


def _ce_loss(variant: str):
    from storyllama.kernels.cross_entropy import linear_cross_entropy_chunked

    if variant == "fused":
        return linear_cross_entropy_chunked
    return lambda x, w, y: F.cross_entropy(x @ w.T, y)  # (N, V) logits in full


def ce_memory_child(variant: str) -> dict:
    """In a fresh process: extra peak RSS (MB) of one loss + backward at the 88m head."""
    torch.manual_seed(0)
    loss_fn = _ce_loss(variant)
    xs, ws = torch.randn(64, 32, requires_grad=True), torch.randn(1000, 32, requires_grad=True)
    loss_fn(xs, ws, torch.randint(0, 1000, (64,))).backward()  # load BLAS / thread pools outside the window
    N, C, V = HEAD["N"], HEAD["C"], HEAD["V"]
    x = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[::10] = -100
    gc.collect()
    before = _status_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (high-water mark not resettable: includes earlier peaks)"
    t0 = time.perf_counter()
    loss = loss_fn(x, w, y)
    loss.backward()
    seconds = time.perf_counter() - t0
    if method.startswith("VmHWM"):
        peak = _status_mb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "peak_extra_MB": peak - before, "seconds": seconds, "loss": loss.item(),
            "grad_bytes_MB": (x.numel() + w.numel()) * 4 / 2**20, "method": method}  # fmt: skip


def ce_memory(variant: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "ce-memory", variant], check=True, capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ CUDA: per-kernel speed


def kernel_case(op: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, B: int = 16, T: int = 512):
    """(reference fn, triton fn, inputs needing grad, other args, bytes moved by forward + backward)."""
    from storyllama.kernels.rmsnorm import rmsnorm, rmsnorm_reference
    from storyllama.kernels.rope import rope, rope_cos_sin, rope_reference
    from storyllama.kernels.swiglu import swiglu, swiglu_reference

    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()
    C, H, D, Fh = 512, 8, 64, 1536  # storyllama-88m: dim, heads, head_dim, SwiGLU width
    es = torch.finfo(dtype).bits // 8
    if op == "rmsnorm":
        x, w = rand(B * T, C), rand(C)
        # forward reads x, writes y; backward reads dy and x, writes dx (rstd and weight are small)
        return rmsnorm_reference, rmsnorm, [x, w], [1e-5], 5 * x.numel() * es
    if op == "rope":
        q = rand(B, T, H, D)
        cos, sin = rope_cos_sin(torch.arange(T, device=device)[None], D, 10000.0)
        # forward reads x, writes y; backward reads dy, writes dx; plus the fp32 tables twice
        return rope_reference, rope, [q], [cos, sin], 4 * q.numel() * es + 4 * cos.numel() * 4
    if op == "swiglu":
        a, b = rand(B * T, Fh), rand(B * T, Fh)
        # forward reads a, b, writes y; backward reads dy, a, b, writes da, db
        return swiglu_reference, swiglu, [a, b], [], 8 * a.numel() * es
    raise ValueError(op)


def fwd_bwd(fn, inputs, extra):
    out = fn(*inputs, *extra)
    dy = torch.ones_like(out)
    return lambda: torch.autograd.grad(fn(*inputs, *extra), inputs, dy)


def cuda_ms(step, warmup: int = 10, rep: int = 50) -> float:
    """Median ms of step() by CUDA events, L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    return float(do_bench(step, warmup=warmup, rep=rep, return_mode="median"))


def kernel_speed(op: str, impl: str) -> dict:
    ref, triton_fn, inputs, extra, nbytes = kernel_case(op)
    fn = {"eager": ref, "compiled": torch.compile(ref, fullgraph=True), "triton": triton_fn}[impl]
    ms = cuda_ms(fwd_bwd(fn, inputs, extra))
    return {"op": op, "impl": impl, "ms": ms, "GB_per_s": nbytes / ms / 1e6}


def ce_speed(impl: str, N: int = 16 * 512, C: int = 512, V: int = 50304) -> dict:
    from storyllama.kernels.cross_entropy import linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, C, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    unfused = lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y)  # what the model does unfused
    fn = {"eager": unfused, "compiled": torch.compile(unfused, fullgraph=True), "triton": linear_cross_entropy}[impl]
    step = lambda: torch.autograd.grad(fn(x, w, y), [x, w])
    ms = cuda_ms(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"op": "linear_ce", "impl": impl, "ms": ms, "TFLOP_per_s": 6 * N * C * V / ms / 1e9, "peak_extra_MB": peak}


# ---------------------------------------------------------------------- CUDA: storyllama-88m training

def peak_tflops() -> float | None:
    from storyllama.metrics import peak_flops

    peak = peak_flops(torch.device("cuda"))
    return peak / 1e12 if peak else None


def train_88m(kernels: str, fused_ce: bool, batch: int = 32, steps: int = 20, warmup: int = 3,
              ddp: bool = False) -> dict:
    """storyllama-88m, torch.compile, bf16 autocast, fused AdamW: tokens/s and MFU over `steps` steps.
    ddp: wrap in DistributedDataParallel in a one-process NCCL group (its overhead against no DDP)."""
    import torch.distributed as dist

    from storyllama.config import preset
    from storyllama.model import Llama

    torch.manual_seed(0)
    cfg = preset("storyllama-88m")
    model = Llama(cfg, kernels=kernels, fused_ce=fused_ce).cuda()
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, fused=True)
    wrapped = model
    if ddp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()],
                                                            gradient_as_bucket_view=True)
    compiled = torch.compile(wrapped)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), device="cuda")

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    tps = batch * cfg.block_size * steps / (time.perf_counter() - t0)
    if ddp:
        dist.destroy_process_group()
    peak = peak_tflops()
    mfu = cfg.flops_per_token() * tps / (peak * 1e12) if peak else None
    return {"kernels": kernels, "fused_ce": fused_ce, "ddp": ddp, "tok_per_s": tps, "MFU": mfu,
            "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


# ------------------------------------------------------------------------------ pytest-benchmark tests

_seen: dict = {}  # results of this run, for ratios between variants


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("variant", ["unfused", "fused"])
def test_ce_peak_memory_cpu(benchmark, variant):
    r = benchmark.pedantic(ce_memory, args=(variant,), rounds=1, iterations=1)
    _seen[variant] = r
    benchmark.extra_info.update({"peak_extra_MB": r["peak_extra_MB"], "cpu_seconds": r["seconds"],
                                 "grads_MB": r["grad_bytes_MB"], "logits_MB": HEAD["N"] * HEAD["V"] * 4 / 2**20,
                                 "method": r["method"]})  # fmt: skip
    if variant == "fused":
        base = _seen.get("unfused") or ce_memory("unfused")
        ratio = r["peak_extra_MB"] / base["peak_extra_MB"]
        benchmark.extra_info["ratio_vs_unfused"] = ratio
        assert abs(r["loss"] - base["loss"]) < 1e-4 * abs(base["loss"])  # the same loss
        assert ratio <= 1 / 3, f"fused peak {r['peak_extra_MB']:.0f} MB vs unfused {base['peak_extra_MB']:.0f} MB"


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
@pytest.mark.parametrize("op", ["rmsnorm", "rope", "swiglu"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_kernel_fwd_bwd_cuda(benchmark, op, impl):
    r = benchmark.pedantic(kernel_speed, args=(op, impl), rounds=1, iterations=1)
    _seen[(op, impl)] = r
    benchmark.extra_info.update({"ms": r["ms"], "GB_per_s": r["GB_per_s"]})
    for other in ("eager", "compiled"):
        if (op, other) in _seen and other != impl:
            benchmark.extra_info[f"speedup_vs_{other}"] = _seen[(op, other)]["ms"] / r["ms"]


@pytest.mark.parametrize("impl", ["eager", "compiled", "triton"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_linear_ce_cuda(benchmark, impl):
    r = benchmark.pedantic(ce_speed, args=(impl,), rounds=1, iterations=1)
    _seen[("linear_ce", impl)] = r
    benchmark.extra_info.update({k: r[k] for k in ("ms", "TFLOP_per_s", "peak_extra_MB")})
    for other in ("eager", "compiled"):
        if ("linear_ce", other) in _seen and other != impl:
            benchmark.extra_info[f"speedup_vs_{other}"] = _seen[("linear_ce", other)]["ms"] / r["ms"]


@pytest.mark.parametrize("kernels, fused_ce", [("reference", False), ("triton", True)])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_train_88m_cuda(benchmark, kernels, fused_ce):
    r = benchmark.pedantic(train_88m, args=(kernels, fused_ce), rounds=1, iterations=1)
    benchmark.extra_info.update({k: r[k] for k in ("tok_per_s", "MFU", "peak_mem_GB")})


# ---------------------------------------------------------------------------------------- script mode


def gpu_table() -> str:
    rows = ["op        impl       ms      GB/s  TFLOP/s  vs eager  vs compiled", "-" * 66]
    for op in ("rmsnorm", "rope", "swiglu", "linear_ce"):
        res = {i: (ce_speed(i) if op == "linear_ce" else kernel_speed(op, i)) for i in ("eager", "compiled", "triton")}
        for impl, r in res.items():
            rows.append(f"{op:<9} {impl:<9} {r['ms']:7.3f} {r.get('GB_per_s', float('nan')):8.0f} "
                        f"{r.get('TFLOP_per_s', float('nan')):8.1f} {res['eager']['ms'] / r['ms']:8.2f}x "
                        f"{res['compiled']['ms'] / r['ms']:10.2f}x")  # fmt: skip
        print(rows[-1], flush=True)
    rows += ["", "storyllama-88m training (compile, bf16 autocast, batch 32 x 512)", "-" * 66]
    results = []
    for kernels, fused, ddp in (("reference", False, False), ("triton", True, False), ("triton", True, True)):
        r = train_88m(kernels, fused, ddp=ddp)
        results.append(r)
        mfu = f"{100 * r['MFU']:.1f}%" if r["MFU"] is not None else "n/a (unknown GPU peak)"
        rows.append(f"kernels={kernels:<9} fused_ce={fused!s:<5} ddp={ddp!s:<5} {r['tok_per_s']:>12,.0f} tok/s  "
                    f"MFU {mfu}  peak {r['peak_mem_GB']:.1f} GB")  # fmt: skip
        print(rows[-1], flush=True)
    rows.append(f"DDP (world size 1) overhead: {100 * (1 - results[2]['tok_per_s'] / results[1]['tok_per_s']):.1f}% "
                "(target < 3%)")
    print(rows[-1], flush=True)
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["ce-memory"]:
        print(json.dumps(ce_memory_child(sys.argv[2])))
    elif sys.argv[1:2] == ["gpu"]:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("\n" + gpu_table())
    else:
        sys.exit(f"usage: {sys.argv[0]} ce-memory fused|unfused | gpu")
