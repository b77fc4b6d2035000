"""The training loop: one process, or N under torchrun with DistributedDataParallel.

    python bin/train --data data/builtin --out runs/demo --preset tiny
    torchrun --standalone --nproc_per_node=gpu bin/train --data ... --out ...

Every optimizer step accumulates `grad_accum` micro-batches; the non-final ones run under
`model.no_sync()`, so DDP all-reduces once per step, overlapped with the last backward pass by its
buckets. Only rank 0 logs, plots, samples, talks to W&B and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from kernels import resolve_backend
from storyllama import checkpoint
from storyllama.config import ModelConfig, TrainConfig, add_dataclass_args, given, pad_vocab, preset
from storyllama.data import RandomBatches, TokenData, bytes_per_token, load_meta, val_batches
from storyllama.model import Llama

log = logging.getLogger("storyllama")

# Dense bf16 peak FLOP/s by GPU name (spec sheets), for MFU; STORYLLAMA_PEAK_TFLOPS overrides.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "A100": 312e12,
                   "L40S": 362.1e12, "A10G": 70e12, "L4": 121e12, "4090": 165.2e12}


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


# -- set-up --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_arg == "auto" else device_arg)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    device = torch.device(f"cuda:{d.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("STORYLLAMA_DIST_TIMEOUT", "300")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout,
                            device_id=device if use_cuda else None)
    return d, device


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    return dtypes[cfg.dtype]


def grad_accum_steps(cfg: TrainConfig, block_size: int, world_size: int) -> int:
    per_micro = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size is None:
        return 1
    if cfg.total_batch_size % per_micro:
        raise ValueError(
            f"--total_batch_size {cfg.total_batch_size} tokens is not a multiple of batch_size x block_size x "
            f"world_size = {cfg.batch_size} x {block_size} x {world_size} = {per_micro}; pick a total batch that is "
            f"(e.g. {max(1, round(cfg.total_batch_size / per_micro)) * per_micro}) or change --batch_size")
    return cfg.total_batch_size // per_micro


def build_model_config(args: argparse.Namespace, vocab_from_data: int) -> ModelConfig:
    overrides = given(args, ModelConfig)
    overrides.setdefault("vocab_size", pad_vocab(vocab_from_data))
    cfg = preset(args.preset or TrainConfig.preset, **overrides)
    if cfg.vocab_size < vocab_from_data:
        raise ValueError(f"--vocab_size {cfg.vocab_size} is smaller than the data's vocabulary ({vocab_from_data})")
    return cfg


# -- evaluation, samples, plots ------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, cfg: TrainConfig, batch_size: int, block_size: int,
             device: torch.device, amp: torch.dtype, d: Dist) -> float:
    """Mean validation loss over the first eval_iters batches of each rank, averaged over ranks."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses, batches)
    max_batches = cfg.eval_iters or None
    for x, y in val_batches(data, batch_size, block_size, d.rank, d.world_size, max_batches):
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = model(x.to(device), y.to(device))
        total[0] += loss.double()
        total[1] += 1
    if d.enabled:
        dist.all_reduce(total)
    model.train()
    if total[1] == 0:
        raise TrainingError("the validation split has no full block; prepare more validation text")
    return (total[0] / total[1]).item()


def sample_text(model: Llama, enc, cfg: TrainConfig, eot_id: int, device: torch.device) -> str:
    from storyllama.config import SampleConfig
    from storyllama.sample import generate

    scfg = SampleConfig(prompt=[cfg.prompt], max_new_tokens=cfg.sample_tokens, temperature=cfg.temperature,
                        top_k=50, seed=cfg.seed)
    prompt = enc.encode_ordinary(cfg.prompt)
    room = model.cfg.block_size - len(prompt)
    if room <= 0:
        return "(prompt longer than the context: no sample)"
    scfg = replace(scfg, max_new_tokens=min(scfg.max_new_tokens, room))
    model.eval()
    try:
        out = generate(model, [prompt], scfg, eot_id=eot_id, vocab_limit=enc.n_vocab)
    finally:
        model.clear_caches()
        model.train()
    return cfg.prompt + enc.decode([t for t in out[0] if t < enc.n_vocab and t != eot_id])


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


# -- the loop ------------------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and exit 0."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, args: argparse.Namespace, on_ddp: Callable | None = None) -> dict:
    """Run training; returns a summary (steps, best validation loss, the trained unwrapped model).

    on_ddp: called with the DistributedDataParallel module once it exists (e.g. to register a comm hook)."""
    d, device = init_distributed(cfg.device)
    stop = StopFlag()
    stop.install()
    try:
        return _train(cfg, args, d, device, stop, on_ddp)
    finally:
        stop.restore()
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, args: argparse.Namespace, d: Dist, device: torch.device, stop: StopFlag,
           on_ddp: Callable | None) -> dict:
    run_dir, data_dir = Path(cfg.out), Path(cfg.data)
    meta = load_meta(data_dir)
    vocab = meta["tokenizer"]["vocab_size"]
    eot_id = meta["tokenizer"]["eot_id"]

    # Resume: the checkpoint's model config wins; flags that contradict it are an error.
    ckpt = _find_resume(cfg, run_dir)
    state: dict = {}
    if ckpt is not None:
        _check_same_tokenizer(ckpt, meta)
        state = checkpoint.load_state(ckpt)
        mcfg = checkpoint.load_model_config(ckpt)
        asked = build_model_config(args, vocab)
        if given(args, ModelConfig) or args.preset:
            diff = {k: (v, getattr(asked, k)) for k, v in asdict(mcfg).items() if v != getattr(asked, k)}
            if diff:
                raise ValueError(f"cannot resume {ckpt}: its model differs from the flags given "
                                 f"({', '.join(f'{k}: checkpoint {a}, flags {b}' for k, (a, b) in diff.items())}); "
                                 "drop those flags or start a new --out")
    else:
        mcfg = build_model_config(args, vocab)
        if mcfg.vocab_size < vocab:
            raise ValueError(f"model vocab {mcfg.vocab_size} < data vocab {vocab}")

    train_data = TokenData(data_dir, "train")
    val_data = TokenData(data_dir, "val")
    T = mcfg.block_size
    accum = grad_accum_steps(cfg, T, d.world_size)
    tokens_per_step = cfg.batch_size * T * d.world_size * accum
    if cfg.epochs is not None:
        cfg = replace(cfg, total_iters=max(1, math.ceil(cfg.epochs * train_data.num_tokens / tokens_per_step)))
    batches = RandomBatches(train_data, cfg.batch_size, T, cfg.seed, d.rank, d.world_size)
    # Validation batches may be smaller than training ones when the split is small; none at all is an error
    # found now, not at the first evaluation.
    val_windows = int(val_data.windows_per_shard(T).sum())
    val_batch = min(cfg.batch_size, val_windows // d.world_size)
    if val_batch == 0:
        raise ValueError(f"the val split of {data_dir} has {val_data.num_tokens:,} tokens: {val_windows} windows of "
                         f"block_size + 1 = {T + 1} tokens, fewer than one per process ({d.world_size}); prepare "
                         "more validation text (--val or --val_fraction) or lower --block_size")
    amp = autocast_dtype(cfg, device)
    backend = resolve_backend(cfg.kernels, device)
    compile_ = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fused_ce = True if cfg.fused_ce is None else cfg.fused_ce

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = Llama(mcfg, kernels=backend, fused_ce=fused_ce).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    step, tokens_seen, best_val, bad_steps = 0, 0, math.inf, 0
    if ckpt is not None:
        checkpoint.load_weights(model, ckpt)
        checkpoint.load_optimizer(optimizer, ckpt)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val = state.get("best_val_loss", math.inf)
        if not cfg.eval_only:  # (scoring alone does not need the training stream's position)
            if state.get("world_size", 1) != d.world_size:
                raise ValueError(f"{ckpt} was written by {state.get('world_size')} processes; resume with the same "
                                 f"number (got {d.world_size}) so every rank continues its own data stream")
            batches.load_state_dict(state["data"][str(d.rank)])

    raw_model = model
    ddp_model = None
    if d.enabled:
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank; broadcasting
        # them would cost a collective per forward (and a graph break under torch.compile).
        model = ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            broadcast_buffers=False)
        if on_ddp is not None:
            on_ddp(ddp_model)
    if compile_:
        model = torch.compile(model)

    if cfg.eval_only:
        if ckpt is None:
            raise ValueError("--eval_only needs a checkpoint: --resume CKPT_DIR (or --resume auto with --out RUN_DIR)")
        val = evaluate(model, val_data, replace(cfg, eval_iters=0), val_batch, T, device, amp, d)
        bpb = val / math.log(2) / bytes_per_token(meta, "val")
        if d.master:
            log.info("%s on the whole val split of %s (%d tokens): loss %.4f, %.4f bits per byte", ckpt, data_dir,
                     val_data.num_tokens, val, bpb)
        return {"step": step, "val_loss": val, "val_bpb": bpb, "model": raw_model}

    enc = None
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        for fname in checkpoint.TOKENIZER_FILES:
            if (data_dir / fname).is_file():
                shutil.copy2(data_dir / fname, run_dir / fname)
        (run_dir / "config.json").write_text(json.dumps({"model": asdict(mcfg), "train": asdict(cfg)}, indent=2))
        from data_prep.tokenizer import load_encoding

        enc = load_encoding(data_dir)
    wandb_run = _init_wandb(cfg, mcfg, run_dir) if (cfg.wandb and d.master) else None
    metrics_path = run_dir / "metrics.jsonl"
    n_params = mcfg.num_params()
    peak = peak_flops(device)
    bpt = bytes_per_token(meta, "val")
    if d.master:
        log.info("model: %s, %.2fM parameters (%s tied embeddings), context %d, vocab %d",
                 args.preset or "custom", n_params / 1e6, "with" if mcfg.tie_embeddings else "without", T,
                 mcfg.vocab_size)
        log.info("device %s x %d, %s, kernels=%s, compile=%s, fused_ce=%s; %d tokens/step = %d x %d x %d ranks x %d "
                 "accumulation", device, d.world_size, str(amp).replace("torch.", ""), backend, compile_, fused_ce,
                 tokens_per_step, cfg.batch_size, T, d.world_size, accum)
        log.info("%s %d steps (from step %d) into %s", "resuming" if ckpt else "training", cfg.total_iters, step,
                 run_dir)

    def save(is_best: bool = False) -> Path | None:
        path = None
        if d.master:
            data_states = _gather_data_states(batches, d)
            st = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val, "world_size": d.world_size,
                  "data": data_states, "train_config": asdict(cfg), "model_config": asdict(mcfg),
                  "tokenizer_sha256": meta["tokenizer"].get("sha256")}
            try:
                path = checkpoint.save(run_dir, step, raw_model, optimizer, st, data_dir, cfg.keep_last, is_best)
            except OSError as e:
                raise TrainingError(f"could not write a checkpoint: {e}. Earlier checkpoints are untouched; free "
                                    "disk space or choose another --out, then --resume auto") from e
        elif d.enabled:
            _gather_data_states(batches, d)
        if d.enabled:
            dist.barrier()
        return path

    def do_eval() -> float:
        nonlocal best_val
        val = evaluate(model, val_data, cfg, val_batch, T, device, amp, d)
        is_best = val < best_val
        best_val = min(best_val, val)
        if d.master:
            bpb = val / math.log(2) / bpt
            rec = {"step": step, "val_loss": val, "val_bpb": bpb, "tokens": tokens_seen}
            _append_jsonl(metrics_path, rec)
            plot_losses(metrics_path, run_dir / "loss.png")
            if wandb_run is not None:
                wandb_run.log({"val/loss": val, "val/bpb": bpb}, step=step)
            log.info("step %d: val loss %.4f, %.4f bits per byte%s", step, val, bpb, " (best)" if is_best else "")
            if cfg.sample_tokens > 0:
                log.info("  sample: %s", sample_text(raw_model, enc, cfg, eot_id, device).replace("\n", " "))
        return is_best

    faults = Faults.from_env()
    model.train()
    bar = tqdm(total=cfg.total_iters, initial=step, disable=not d.master, dynamic_ncols=True, unit="step",
               file=sys.stderr)
    t_start = time.time()
    t_log, tok_log = time.time(), 0
    stopped_by = None
    last_loss = float("nan")
    while step < cfg.total_iters:
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout randomness is a function of (seed, step, rank): a resumed run draws the same masks.
        torch.manual_seed(cfg.seed + 1_000_003 * (step + 1) + 7919 * d.rank)
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = batches.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Non-final micro-steps keep their gradients local; the last backward all-reduces, bucket by bucket.
            sync_ctx = ddp_model.no_sync() if ddp_model is not None and micro < accum - 1 else contextlib.nullcontext()
            with sync_ctx, torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                loss = model(x, y) / accum
            loss.backward()
            loss_sum += loss.detach()
        if faults.nan_at == step:
            loss_sum += math.nan  # injected: the step must be skipped like a real non-finite loss
        # The norm is of the all-reduced gradients, so every rank takes the same decision below.
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip)
        if torch.isfinite(grad_norm) and torch.isfinite(loss_sum):
            optimizer.step()
            bad_steps = 0
        else:
            bad_steps += 1
            if d.master:
                log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); update skipped (%d/%d)",
                            step, loss_sum.item(), grad_norm.item(), bad_steps, cfg.max_bad_steps)
        optimizer.zero_grad(set_to_none=True)
        if bad_steps >= cfg.max_bad_steps:
            raise TrainingError(f"{bad_steps} non-finite steps in a row at step {step}; stopping. The last good "
                                f"checkpoint is kept in {run_dir / 'checkpoints'}; lower --max_lr or check the data")
        if faults.fail_at == (d.rank, step):
            raise RuntimeError(f"injected failure on rank {d.rank} at step {step} (STORYLLAMA_TEST_FAIL_AT)")
        step += 1
        tokens_seen += tokens_per_step
        tok_log += tokens_per_step
        bar.update(1)

        if step % cfg.log_interval == 0 or step == cfg.total_iters:
            last_loss = loss_sum.item()
            if d.enabled:  # report the mean over ranks
                t = torch.tensor([last_loss], device=device)
                dist.all_reduce(t)
                last_loss = t.item() / d.world_size
            dt = time.time() - t_log
            tps = tok_log / max(dt, 1e-9)
            t_log, tok_log = time.time(), 0
            rec = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens_seen,
                   "tok_per_s": tps, "elapsed_s": time.time() - t_start}
            post = {"loss": f"{last_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:,.0f}"}
            if peak:
                rec["mfu"] = mcfg.flops_per_token() * tps / (peak * d.world_size)
                post["mfu"] = f"{100 * rec['mfu']:.1f}%"
            if d.master:
                bar.set_postfix(post, refresh=False)
                _append_jsonl(metrics_path, rec)
                if wandb_run is not None:
                    wandb_run.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)

        stopped_by = _should_stop(stop, cfg, t_start, d, device)
        final = step == cfg.total_iters or stopped_by is not None
        is_best = False
        if step % cfg.eval_interval == 0 or final:
            is_best = do_eval()
        if step % cfg.save_interval == 0 or final or (is_best and cfg.keep_best):
            path = save(is_best=is_best and cfg.keep_best)
            if d.master:
                bar.write(f"checkpoint: {path}")
        if stopped_by is not None:
            break
    bar.close()
    if wandb_run is not None:
        wandb_run.finish()
    summary = {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val, "run_dir": str(run_dir),
               "best_val_bpb": best_val / math.log(2) / bpt, "stopped_by": stopped_by, "model": raw_model}
    if d.master:
        if stopped_by is not None:
            log.info("stopped by %s at step %d; checkpoint saved. Continue with: bin/train --data %s --out %s "
                     "--resume auto", stopped_by, step, data_dir, run_dir)
        log.info("done: best val loss %.4f (%.4f bits per byte); checkpoints in %s, metrics %s, plot %s",
                 best_val, summary["best_val_bpb"], run_dir / "checkpoints", metrics_path, run_dir / "loss.png")
    return summary


@dataclass(frozen=True)
class Faults:
    """Fault injection for the reliability tests, read once from the environment:
    STORYLLAMA_TEST_FAIL_AT="RANK:STEP" raises on that rank at that step; STORYLLAMA_TEST_NAN_AT="STEP"
    makes that step's loss NaN."""

    fail_at: tuple[int, int] | None = None
    nan_at: int | None = None

    @classmethod
    def from_env(cls) -> Faults:
        fail = os.environ.get("STORYLLAMA_TEST_FAIL_AT")
        nan = os.environ.get("STORYLLAMA_TEST_NAN_AT")
        return cls(tuple(map(int, fail.split(":"))) if fail else None, int(nan) if nan else None)


def _should_stop(stop: StopFlag, cfg: TrainConfig, t_start: float, d: Dist, device: torch.device) -> str | None:
    """A signal or the time budget; under DDP all ranks agree (any rank's reason stops all)."""
    code = 0
    if stop.signum is not None:
        code = 1
    elif cfg.max_time is not None and time.time() - t_start >= cfg.max_time:
        code = 2
    if d.enabled:
        t = torch.tensor([code], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
    return {0: None, 1: "a signal (SIGTERM/SIGINT)", 2: f"--max_time {cfg.max_time}s"}[code]


def _gather_data_states(batches: RandomBatches, d: Dist) -> dict:
    """Every rank's data position, collected on rank 0 (a collective: all ranks call it)."""
    mine = batches.state_dict()
    if not d.enabled:
        return {"0": mine}
    out: list = [None] * d.world_size
    dist.all_gather_object(out, mine)
    return {str(r): s for r, s in enumerate(out)}


def _find_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    if cfg.resume is None:
        if (run_dir / "checkpoints" / "latest").exists():
            raise ValueError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, or "
                             "choose a new --out")
        return None
    if cfg.resume == "auto":
        if not (run_dir / "checkpoints" / "latest").exists():
            return None
        return checkpoint.resolve(run_dir)
    return checkpoint.resolve(cfg.resume)


def _check_same_tokenizer(ckpt: Path, meta: dict) -> None:
    ckpt_meta = ckpt / "meta.json"
    if not ckpt_meta.is_file():
        return
    theirs = json.loads(ckpt_meta.read_text())["tokenizer"]
    ours = meta["tokenizer"]
    if theirs.get("sha256") != ours.get("sha256") or theirs.get("name") != ours.get("name"):
        raise ValueError(f"the data's tokenizer ({ours.get('name')}, sha256 {str(ours.get('sha256'))[:12]}) differs "
                         f"from the checkpoint's ({theirs.get('name')}, {str(theirs.get('sha256'))[:12]}); resume "
                         "on data prepared with the same tokenizer")


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None where unknown (no MFU then)."""
    if device.type != "cuda":
        return None
    if os.environ.get("STORYLLAMA_PEAK_TFLOPS"):
        return float(os.environ["STORYLLAMA_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _init_wandb(cfg: TrainConfig, mcfg: ModelConfig, run_dir: Path):
    import wandb

    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or run_dir.name, dir=str(run_dir),
                      config={"model": asdict(mcfg), "train": asdict(cfg)})


# -- command line --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bin/train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(p, TrainConfig, prefix_help="training")
    add_dataclass_args(p, ModelConfig, prefix_help="model (overrides the preset)")
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    tc = given(args, TrainConfig)
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in tc.items() if k in names}), args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks
    try:
        cfg, args = parse_config(argv)
        summary = train(cfg, args)
    except (ValueError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only or missing directories, ...
        print(f"error: {e.strerror or e} ({e.filename or cfg.out}); the last complete checkpoint is kept. Free "
              "space or fix the path, then run again with --resume auto", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory on the GPU ({str(e).splitlines()[0]}); lower --batch_size (the micro batch) "
              "and keep --total_batch_size: accumulation makes up the difference", file=sys.stderr)
        return 2
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
