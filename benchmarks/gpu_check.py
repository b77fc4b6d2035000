"""The GPU check behind benchmarks/gpu_check.sh: every stage, then ONE table.

Stages (CUDA, one GPU; about 6-8 minutes on an H200, mostly torch.compile):
  tests     the kernel tests on CUDA (tests/test_kernels.py -m gpu; GPU_TESTS=all for the whole file)
  kernel    forward + backward ms and GB/s of RMSNorm, RoPE, SwiGLU (bf16, storyllama-88m shapes at 16 x 512
            tokens) and the fused linear + cross-entropy (TFLOP/s): eager reference, torch.compile of the
            reference, the Triton op; ratios against eager and against compiled
  train     tokens/s and MFU for `small` and `storyllama-88m` (bf16 autocast, fused AdamW), kernels off
            (reference ops, unfused loss) / on (Triton ops, fused loss) x compile off / on
  sample    decode tokens/s at batch 1 and 8 (storyllama-88m, bf16 weights, 16-token prompt, greedy): the eager
            step, the compiled step (CUDA graphs), each against the bandwidth ceiling (batch x copy GB/s /
            weight bytes: every step reads every weight once)
  ddp       the NCCL world-size-1 DistributedDataParallel overhead on the storyllama-88m step (kernels and
            compile on)

--dry-run (CPU, or CUDA when present): every stage on tiny shapes (training: 16 tokens x 2, 2 layers, vocabulary
512, the presets' widths) with one or two iterations, torch.compile
with dynamo's aot_eager backend (traces every graph, generates no code), the Triton kernels through the
interpreter, gloo for DDP: a check that the script runs (tests/test_gpu_check.py), not a measurement.

    python benchmarks/gpu_check.py [--dry-run]
Installs nothing. MFU is against the dense bf16 peak of storyllama.metrics.peak_flops (STORYLLAMA_PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU runs the kernels interpreted

import torch.nn.functional as F  # noqa: E402

KERNEL_OPS = ("rmsnorm", "rope", "swiglu", "linear_ce")
IMPLS = ("eager", "compiled", "triton")
TRAIN_PRESETS = ("small", "storyllama-88m")
SAMPLE_BATCHES = (1, 8)


@dataclass
class Plan:
    """Sizes of one run: the real check, or the dry run's tiny shapes."""

    device: torch.device
    dry: bool
    kernel_tokens: tuple[int, int] = (16, 512)  # (B, T) for the elementwise kernels
    ce_shape: tuple[int, int, int] = (16 * 512, 512, 50304)  # (N, C, V)
    train_batch: int = 32
    train_block: int | None = None  # None: the preset's context
    train_steps: int = 10
    train_warmup: int = 2
    sample_new_tokens: int = 128
    copy_mb: int = 1024
    compile_backend: str = "inductor"
    model_overrides: dict = field(default_factory=dict)  # on top of each training preset

    @classmethod
    def make(cls, dry: bool) -> Plan:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if not dry:
            return cls(device, dry)
        return cls(device, dry, kernel_tokens=(1, 16), ce_shape=(32, 64, 300), train_batch=2, train_block=16,
                   train_steps=1, train_warmup=1, sample_new_tokens=4, copy_mb=16, compile_backend="aot_eager",
                   model_overrides={"vocab_size": 512, "n_layers": 2})


@dataclass
class Row:
    stage: str
    case: str
    ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    tok_s: float | None = None
    mfu: float | None = None
    ratios: dict[str, float] = field(default_factory=dict)
    note: str = ""


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step, device: torch.device, dry: bool) -> float:
    """Median ms of step(): triton.testing.do_bench on CUDA (L2 flushed), a few perf_counter runs elsewhere."""
    step()  # compile / autotune outside the timing
    sync(device)
    if device.type == "cuda" and not dry:
        from triton.testing import do_bench

        return float(do_bench(step, warmup=10, rep=50, return_mode="median"))
    times = []
    for _ in range(1 if dry else 5):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def compiled(fn, plan: Plan, **kw):
    return torch.compile(fn, backend=plan.compile_backend, **kw)


# --------------------------------------------------------------------------------------------- stages
def stage_tests(plan: Plan) -> list[Row]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]
    if plan.dry:
        cmd += ["-k", "test_rmsnorm_launchers_keep_rstd_fp32"]
        case = "tests/test_kernels.py (dry-run subset)"
    elif os.environ.get("GPU_TESTS") == "all":
        case = "tests/test_kernels.py (all, on CUDA)"
    else:
        cmd += ["-m", "gpu"]
        case = "tests/test_kernels.py -m gpu"
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", res.stdout))
    note = ", ".join(f"{n} {k}" for k, n in counts.items()) or res.stdout.strip().splitlines()[-1:]
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-2000:])
        note = f"FAILED (exit {res.returncode}): {note}"
    return [Row("tests", case, ms=(time.perf_counter() - t0) * 1e3, note=str(note))]


def _kernel_row(op: str, impl: str, plan: Plan, base: dict[str, float]) -> Row:
    from test_bench_kernels import fwd_bwd, kernel_case

    from storyllama.kernels.cross_entropy import linear_cross_entropy

    dtype = torch.bfloat16 if plan.device.type == "cuda" else torch.float32
    if op == "linear_ce":
        N, C, V = plan.ce_shape
        g = torch.Generator(device=plan.device).manual_seed(0)
        x = torch.randn(N, C, device=plan.device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(V, C, device=plan.device, generator=g) * 0.02).to(dtype).requires_grad_()
        y = torch.randint(0, V, (N,), device=plan.device, generator=g)
        unfused = lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y)  # what the model does unfused
        fn = {"eager": unfused, "compiled": compiled(unfused, plan, fullgraph=True), "triton": linear_cross_entropy}
        step = lambda: torch.autograd.grad(fn[impl](x, w, y), [x, w])
        ms = time_ms(step, plan.device, plan.dry)
        row = Row("kernel", f"{op} {impl}", ms=ms, tflops=6 * N * C * V / ms / 1e9)
    else:
        B, T = plan.kernel_tokens
        ref, triton_fn, inputs, extra, nbytes = kernel_case(op, str(plan.device), dtype, B, T)
        fn = {"eager": ref, "compiled": compiled(ref, plan, fullgraph=True), "triton": triton_fn}[impl]
        ms = time_ms(fwd_bwd(fn, inputs, extra), plan.device, plan.dry)
        row = Row("kernel", f"{op} {impl}", ms=ms, gbps=nbytes / ms / 1e6)
    base[impl] = ms
    for other in ("eager", "compiled"):
        if other != impl and other in base:
            row.ratios[f"x vs {other}"] = base[other] / ms  # speedup
    return row


def stage_kernels(plan: Plan) -> list[Row]:
    rows = []
    for op in KERNEL_OPS:
        base: dict[str, float] = {}
        for impl in IMPLS:
            rows += _guard(lambda op=op, impl=impl, base=base: [_kernel_row(op, impl, plan, base)], "kernel",
                           f"{op} {impl}")
    return rows


def train_throughput(name: str, kernels_on: bool, compile_on: bool, plan: Plan, ddp: bool = False) -> dict:
    """tokens/s and MFU of training steps (forward, backward, fused AdamW where available)."""
    import torch.distributed as dist

    from storyllama.config import preset
    from storyllama.metrics import peak_flops
    from storyllama.model import Llama

    torch.manual_seed(0)
    over = {"dropout": 0.0, **plan.model_overrides} | ({"block_size": plan.train_block} if plan.train_block else {})
    cfg = preset(name, **over)
    model = Llama(cfg, kernels="triton" if kernels_on else "reference", fused_ce=kernels_on).to(plan.device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-4, fused=plan.device.type == "cuda")
    wrapped, store_dir = model, None
    if ddp:
        store_dir = tempfile.TemporaryDirectory()
        backend = "nccl" if plan.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.FileStore(os.path.join(store_dir.name, "store"), 1), rank=0,
                                world_size=1)
        ids = [plan.device.index or 0] if plan.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    step_model = compiled(wrapped, plan) if compile_on else wrapped
    B, T = plan.train_batch, cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (B, T), device=plan.device)
    y = torch.randint(0, cfg.vocab_size, (B, T), device=plan.device)
    autocast = plan.device.type == "cuda"

    def step():
        with torch.autocast(plan.device.type, torch.bfloat16, enabled=autocast):
            loss = step_model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(plan.train_warmup):
            step()
        sync(plan.device)
        t0 = time.perf_counter()
        for _ in range(plan.train_steps):
            step()
        sync(plan.device)
        tps = B * T * plan.train_steps / (time.perf_counter() - t0)
    finally:
        if ddp:
            dist.destroy_process_group()
            store_dir.cleanup()
    peak = peak_flops(plan.device)
    return {"tok_s": tps, "mfu": cfg.flops_per_token() * tps / peak if peak else None}


def stage_train(plan: Plan) -> list[Row]:
    rows = []
    for name in TRAIN_PRESETS:
        base = None
        for kernels_on in (False, True):
            for compile_on in (False, True):
                case = f"{name} kernels={'on' if kernels_on else 'off'} compile={'on' if compile_on else 'off'}"

                def one(name=name, kernels_on=kernels_on, compile_on=compile_on, case=case):
                    nonlocal base
                    r = train_throughput(name, kernels_on, compile_on, plan)
                    row = Row("train", case, tok_s=r["tok_s"], mfu=r["mfu"],
                              note="" if r["mfu"] is not None else "MFU: GPU peak unknown")
                    if base is None:
                        base = r["tok_s"]
                    else:
                        row.ratios["x vs eager/off"] = r["tok_s"] / base
                    return [row]

                rows += _guard(one, "train", case)
    return rows


def copy_gbps(plan: Plan) -> float:
    """Device memory bandwidth: bytes read + written by a large copy / time."""
    src = torch.empty(plan.copy_mb << 18, device=plan.device)  # copy_mb MB of fp32
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), plan.device, plan.dry)
    return 2 * src.nbytes / ms / 1e6


def stage_sample(plan: Plan) -> list[Row]:
    from storyllama import sample
    from storyllama.config import SampleConfig, preset
    from storyllama.kernels.ops import resolve_backend
    from storyllama.model import Llama

    torch.manual_seed(0)
    cfg = preset("storyllama-88m", dropout=0.0) if not plan.dry else preset("tiny", dropout=0.0)
    model = Llama(cfg, kernels=resolve_backend("auto", plan.device)).to(plan.device).eval()
    if plan.device.type == "cuda":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)  # as bin/sample --dtype bfloat16; RoPE tables stay fp32
    if plan.dry:  # the compiled step through dynamo's eager backend: traces, no code generation
        sample._compiled_steps.setdefault(
            "reduce-overhead" if plan.device.type == "cuda" else "default",
            torch.compile(sample._decode_step, backend="aot_eager", dynamic=False, fullgraph=True))
    weight_bytes = sum(p.nbytes for p in model.parameters())
    gbps = copy_gbps(plan)
    rows = [Row("sample", "copy bandwidth", gbps=gbps, note=f"weights {weight_bytes / 1e6:.0f} MB")]
    for B in SAMPLE_BATCHES:
        eager_tps = None
        for comp in (False, True):
            case = f"batch {B} {'compiled step (CUDA graph)' if comp else 'eager step'}"

            def one(B=B, comp=comp, case=case):
                nonlocal eager_tps
                scfg = SampleConfig(max_new_tokens=plan.sample_new_tokens, temperature=0.0, compile=comp)
                g = torch.Generator().manual_seed(B)
                prompts = torch.randint(0, cfg.vocab_size, (B, 16), generator=g).tolist()
                sample.generate(model, prompts, scfg, None, cfg.vocab_size)  # warm-up: compiles, records the graph
                stats: dict = {}
                sample.generate(model, prompts, scfg, None, cfg.vocab_size, stats=stats)
                tps = (stats["new_tokens"] - 1) * B / stats["decode_s"]
                ceiling = B * gbps * 1e9 / weight_bytes  # every step reads every weight once
                row = Row("sample", case, ms=stats["decode_s"] * 1e3 / (stats["new_tokens"] - 1), tok_s=tps,
                          ratios={"of ceiling": tps / ceiling})
                if comp and eager_tps:
                    row.ratios["x vs eager"] = tps / eager_tps
                eager_tps = tps if not comp else eager_tps
                return [row]

            rows += _guard(one, "sample", case)
    return rows


def stage_ddp(plan: Plan) -> list[Row]:
    name = "storyllama-88m" if not plan.dry else "small"
    plain = train_throughput(name, True, True, plan)
    wrapped = train_throughput(name, True, True, plan, ddp=True)
    backend = "NCCL" if plan.device.type == "cuda" else "gloo"
    overhead = 1 - wrapped["tok_s"] / plain["tok_s"]
    return [Row("ddp", f"{name} {backend} world size 1", tok_s=wrapped["tok_s"], mfu=wrapped["mfu"],
                ratios={"x vs no DDP": wrapped["tok_s"] / plain["tok_s"]},
                note=f"overhead {100 * overhead:.1f}% (target < 3%)")]


def _guard(fn, stage: str, case: str) -> list[Row]:
    """Run one measurement; an exception becomes an ERROR row (the table still prints every row)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and on stderr
        traceback.print_exc()
        return [Row(stage, case, note=f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")]


STAGES = {"tests": stage_tests, "kernel": stage_kernels, "train": stage_train, "sample": stage_sample,
          "ddp": stage_ddp}


# ---------------------------------------------------------------------------------------------- table
def _f(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_table(rows: list[Row]) -> str:
    head = ("stage", "case", "ms", "GB/s", "TFLOP/s", "tokens/s", "MFU", "ratios", "note")
    body = [(r.stage, r.case, _f(r.ms, ".3f"), _f(r.gbps, ",.0f"), _f(r.tflops, ".1f"), _f(r.tok_s, ",.0f"),
             "" if r.mfu is None else f"{100 * r.mfu:.1f}%", ", ".join(f"{v:.2f} {k}" for k, v in r.ratios.items()),
             r.note) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *(line(b).rstrip() for b in body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one iteration, any device: does it run")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    a = p.parse_args(argv)
    plan = Plan.make(a.dry_run)
    if plan.device.type != "cuda" and not plan.dry:
        print("gpu_check: no CUDA device (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name in a.stages.split(","):
        t = time.perf_counter()
        rows += _guard(lambda name=name: STAGES[name](plan), name, "(stage)")
        print(f"gpu_check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    what = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU"
    print(f"\ngpu_check{' --dry-run' if plan.dry else ''}: {what}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(format_table(rows))
    failed = [r for r in rows if r.note.startswith(("ERROR", "FAILED"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
