"""The training loop: one process, or N under torchrun with DistributedDataParallel.

    python bin/train --data data/builtin --out runs/demo --preset tiny
    torchrun --standalone --nproc_per_node=gpu bin/train --data ... --out ...

Read it top to bottom: `resolve_config` (a resumed run takes its settings from its checkpoint),
`build_run` (data, model, optimizer, DDP, compile), `train_step` (one optimizer step), then `train`,
the loop, with `report`, `evaluate` and `save` beside it.

Every optimizer step accumulates `grad_accum` micro-batches; the non-final ones run under
`model.no_sync()`, so DDP all-reduces once per step, overlapped with the last backward pass by its
buckets. The step never waits for the device: a non-finite loss or gradient skips the update on the
device (fused AdamW's `found_inf`), the next batch is copied while the current one computes, and
the host reads the device only every `--log_interval` steps (the loss, the skipped steps and, under
DDP, the stop agreement). Only rank 0 logs, plots, samples, talks to W&B and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from storyllama import checkpoint
from storyllama.config import (
    DROPOUT_RATES,
    SEED_RECIPE,
    ModelConfig,
    OneLineErrorParser,
    TrainConfig,
    add_dataclass_args,
    given,
    pad_vocab,
    preset,
)
from storyllama.data import RandomBatches, TokenData, bytes_per_token, load_meta, val_batches
from storyllama.devices import resolve_dtype
from storyllama.distributed import (
    STOP_REASONS,
    Dist,
    StopFlag,
    agree,
    barrier,
    destroy,
    init_distributed,
    restart_count,
)
from storyllama.inputs import field as input_field
from storyllama.inputs import read_json
from storyllama.kernels.ops import resolve_backend
from storyllama.locking import DirLock
from storyllama.metrics import Metrics, check_wandb_login, peak_flops
from storyllama.model import Llama
from storyllama.optim import Ema, MuonAdamW, build_optimizer

log = logging.getLogger("storyllama")

# Settings that belong to this invocation, not to the run: a resumed run never takes them from its checkpoint.
_PER_INVOCATION = ("out", "resume", "eval_only", "device", "trust_unverified")


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


# -- configuration ---------------------------------------------------------------------------------------
def resolve_config(cfg: TrainConfig, args: argparse.Namespace) -> tuple[TrainConfig, Path | None, dict]:
    """(the run's settings, the checkpoint to resume from or None, its trainer state).

    A resumed run takes every training setting from its checkpoint; flags given now change them on
    purpose, and the change is said."""
    ckpt = _find_resume(cfg, Path(cfg.out))
    if ckpt is None:
        if cfg.init_from is not None:  # a fine-tune: the seed's optimizer settings unless given (SEED_RECIPE)
            seed = {k: v for k, v in SEED_RECIPE.items() if k not in given(args, TrainConfig)}
            cfg = replace(cfg, **seed)
            if seed and int(os.environ.get("RANK", "0")) == 0:
                log.info("fine-tuning with the seed recipe's %s (flags given now override it)",
                         ", ".join(f"{k} {v}" for k, v in seed.items()))
        return cfg, None, {}
    state = checkpoint.load_state(ckpt)
    saved = {k: v for k, v in state.get("train_config", {}).items() if k in {f.name for f in fields(TrainConfig)}}
    saved = {**SEED_RECIPE, **saved}  # a checkpoint older than a recipe field was trained with the seed's value
    now = given(args, TrainConfig)
    merged = {**saved, **{k: getattr(cfg, k) for k in _PER_INVOCATION}, **now}
    if "epochs" in now:  # --epochs given now sets the length again
        merged.pop("total_iters", None)
    resolved = TrainConfig(**merged)
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k not in _PER_INVOCATION}
    if resolved.optimizer != saved["optimizer"]:
        raise ValueError(f"{ckpt} was trained with --optimizer {saved['optimizer']}; its optimizer state "
                         f"cannot continue as {resolved.optimizer}: resume with the same --optimizer, or start a new "
                         "run from its weights with --init_from")
    if changed and int(os.environ.get("RANK", "0")) == 0:
        log.info("resuming %s with changed settings: %s", ckpt,
                 ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    return resolved, ckpt, state


def _find_resume(cfg: TrainConfig, run_dir: Path) -> Path | None:
    restarts = restart_count()
    if cfg.resume is None and restarts > 0 and checkpoint.has_checkpoints(run_dir):
        # torchrun restarted the worker group after a failure: continue from the newest checkpoint, with the
        # same command line as the first launch
        ckpt = checkpoint.resolve(run_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            log.info("torchrun restart %d: resuming from %s (step %d); the steps after it are trained again",
                     restarts, ckpt, checkpoint.load_state(ckpt).get("step", 0))
        return ckpt
    if cfg.resume is None:
        if checkpoint.has_checkpoints(run_dir):
            raise ValueError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run, or "
                             "choose a new --out")
        return None
    if cfg.resume == "auto":
        if not checkpoint.has_checkpoints(run_dir):
            return None
        return checkpoint.resolve(run_dir)  # `latest`, or the newest checkpoint that verifies (the log says so)
    return checkpoint.resolve(cfg.resume)


def build_model_config(args: argparse.Namespace, vocab_from_data: int) -> ModelConfig:
    overrides = given(args, ModelConfig)
    overrides.setdefault("vocab_size", pad_vocab(vocab_from_data))
    cfg = preset(args.preset or TrainConfig.preset, **overrides)
    if cfg.vocab_size < vocab_from_data:
        raise ValueError(f"--vocab_size {cfg.vocab_size} is smaller than the data's vocabulary ({vocab_from_data})")
    return cfg


def _model_config(args: argparse.Namespace, ckpt: Path | None, meta: dict, init_from: str | None) -> ModelConfig:
    """The checkpoint's model when resuming or fine-tuning (flags that contradict it are an error, but for
    --dropout and --attn_dropout when fine-tuning), else the flags'."""
    asked = build_model_config(args, meta["tokenizer"]["vocab_size"])
    source = ckpt if ckpt is not None else (checkpoint.resolve(init_from) if init_from else None)
    if source is None:
        return asked
    mcfg = checkpoint.load_model_config(source)
    if ckpt is None:
        rates = [k for k in DROPOUT_RATES if k in given(args, ModelConfig)]
        mcfg = replace(mcfg, **{k: getattr(asked, k) for k in rates})
    if given(args, ModelConfig) or args.preset:
        diff = {k: (v, getattr(asked, k)) for k, v in asdict(mcfg).items() if v != getattr(asked, k)}
        if diff:
            differs = ", ".join(f"{k}: checkpoint {a}, flags {b}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot {'resume' if ckpt is not None else 'start from'} {source}: its model differs "
                             f"from the flags given ({differs}); drop those flags or start a new --out")
    return mcfg


def _check_same_tokenizer(ckpt: Path, meta: dict) -> None:
    ckpt_meta = ckpt / "meta.json"
    if not ckpt_meta.is_file():
        return
    theirs = input_field(read_json(ckpt_meta), "tokenizer", ckpt_meta, dict)
    ours = meta["tokenizer"]
    if theirs.get("sha256") != ours.get("sha256") or theirs.get("name") != ours.get("name"):
        raise ValueError(f"the data's tokenizer ({ours.get('name')}, sha256 {str(ours.get('sha256'))[:12]}) differs "
                         f"from the checkpoint's ({theirs.get('name')}, {str(theirs.get('sha256'))[:12]}); resume "
                         "on data prepared with the same tokenizer")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return resolve_dtype(cfg.dtype)


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


# -- the run: everything the loop needs, built once ------------------------------------------------------
@dataclass
class Run:
    cfg: TrainConfig
    mcfg: ModelConfig
    d: Dist
    device: torch.device
    amp: torch.dtype
    run_dir: Path
    data_dir: Path
    meta: dict
    raw_model: Llama  # the unwrapped model: what is saved and sampled
    model: torch.nn.Module  # what is called: raw_model, wrapped by DDP and/or compiled
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    batches: Prefetcher
    val_data: TokenData
    val_batch: int
    accum: int
    tokens_per_step: int
    describe: str  # kernels, compile, fused loss: for the log
    host_reads: Counter = field(default_factory=Counter)  # device -> host reads by purpose (tests count them)
    ema: Ema | None = None  # --ema_decay: the averaged weights, updated after every optimizer step


@dataclass
class Progress:
    """What the loop advances. The three counters live on the device and are read at log steps only."""

    step: int
    tokens_seen: int
    best_val: float
    bad_run: torch.Tensor  # skipped updates in a row, now
    worst_run: torch.Tensor  # the longest such run since the last read
    skipped: torch.Tensor  # skipped updates since the last read

    @classmethod
    def start(cls, state: dict, device: torch.device) -> Progress:
        zero = lambda: torch.zeros((), dtype=torch.int32, device=device)  # noqa: E731
        return cls(state.get("step", 0), state.get("tokens_seen", 0), state.get("best_val_loss", math.inf),
                   zero(), zero(), zero())


class Prefetcher:
    """Training batches already on the device: batch n+1 is gathered and its copy issued (pinned memory,
    non_blocking) before batch n's step is queued, so the device never waits for the data."""

    def __init__(self, batches: RandomBatches, device: torch.device):
        self.batches, self.device = batches, device
        self._next: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches.batch_at(position)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.batches.position
        batch = self._next[1] if self._next is not None and self._next[0] == pos else self._load(pos)
        self.batches.position = pos + 1  # the stream position counts batches handed out, not prefetched
        self._next = (pos + 1, self._load(pos + 1))
        return batch


def build_run(cfg: TrainConfig, args: argparse.Namespace, d: Dist, device: torch.device, ckpt: Path | None,
              state: dict) -> Run:
    data_dir = Path(cfg.data)
    meta = load_meta(data_dir)
    if ckpt is not None:
        _check_same_tokenizer(ckpt, meta)
    init_from = cfg.init_from if ckpt is None else None  # a resumed fine-tune continues from its own checkpoint
    mcfg = _model_config(args, ckpt, meta, init_from)
    T = mcfg.block_size
    train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    if cfg.doc_aligned is None:  # request/story data is read a pair per window: README, "Story requests"
        cfg = replace(cfg, doc_aligned=train_data.masks is not None)
    accum = grad_accum_steps(cfg, T, d.world_size)
    tokens_per_step = cfg.batch_size * T * d.world_size * accum
    batches = RandomBatches(train_data, cfg.batch_size, T, cfg.seed, d.rank, d.world_size, accum, cfg.doc_aligned)
    if cfg.epochs is not None:  # from now on the run is that many steps; resuming keeps them
        # an epoch of document-aligned windows reads more tokens than the split holds (cut stories are read again)
        epoch_tokens = batches.num_windows * T if cfg.doc_aligned else train_data.num_tokens
        cfg = replace(cfg, total_iters=max(1, math.ceil(cfg.epochs * epoch_tokens / tokens_per_step)), epochs=None)
    val_batch = _val_batch_size(val_data, cfg, T, d, data_dir)

    backend = resolve_backend(cfg.kernels, device)
    compile_ = cfg.compile if cfg.compile is not None else device.type == "cuda"
    fused_ce = True if cfg.fused_ce is None else cfg.fused_ce
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw_model = Llama(mcfg, kernels=backend, fused_ce=fused_ce).to(device)
    if cfg.zero_init and ckpt is None and init_from is None:  # an init choice: fresh runs only
        raw_model.zero_output_projections()
    optimizer = build_optimizer(raw_model, cfg, device)
    if init_from is not None:  # weights only; the optimizer, step and data position start fresh
        from storyllama.importer import init_weights_from

        source = init_weights_from(raw_model, init_from, meta)
        if d.master:
            log.info("fine-tuning from %s: its weights, a fresh optimizer, step 0", source)
    if ckpt is not None:
        checkpoint.load_weights(raw_model, ckpt)
        # The saved state brings its groups' hyper-parameters back (betas, weight decay, fused, ...); this run's
        # settings win: a flag changed on resume is applied, and a state saved by an unfused optimizer does
        # not switch ours off. (The lr is set at every step.)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        checkpoint.load_optimizer(optimizer, ckpt)
        for group, mine in zip(optimizer.param_groups, settings, strict=True):
            group.update(mine)
        data_state = state.get("data")  # none in an imported run: its training starts at the first window
        if data_state is not None and not cfg.eval_only:  # (scoring needs no stream position)
            # one global position (any world size with the same tokens per step); older checkpoints kept one
            # per rank, all at the same position
            batches.load_state_dict(data_state.get("0", data_state))
    ema = _build_ema(raw_model, cfg, ckpt, d)
    model, ddp = raw_model, None
    if d.enabled:
        # broadcast_buffers=False: the only buffers are the RoPE tables, identical on every rank; broadcasting
        # them would cost a collective per forward (and a graph break under torch.compile).
        model = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            broadcast_buffers=False)
    if compile_:
        model = torch.compile(model)
    return Run(cfg, mcfg, d, device, autocast_dtype(cfg, device), Path(cfg.out), data_dir, meta, raw_model, model,
               ddp, optimizer, Prefetcher(batches, device), val_data, val_batch, accum, tokens_per_step,
               f"kernels={backend}, compile={compile_}, fused_ce={fused_ce}, optimizer={cfg.optimizer}, "
               f"doc_aligned={cfg.doc_aligned}", ema=ema)


def _build_ema(raw_model: Llama, cfg: TrainConfig, ckpt: Path | None, d: Dist) -> Ema | None:
    """--ema_decay: the average starts at the run's starting weights, or continues the checkpoint's."""
    if cfg.ema_decay == 0:
        return None
    ema = Ema(raw_model, cfg.ema_decay)
    if ckpt is not None and (ckpt / checkpoint.EMA_WEIGHTS).is_file():
        checkpoint.load_weights(ema.module, ckpt, "ema")
    elif ckpt is not None and d.master:
        log.info("%s has no EMA weights: the average starts from its weights now", ckpt)
    return ema


def _val_batch_size(val_data: TokenData, cfg: TrainConfig, T: int, d: Dist, data_dir: Path) -> int:
    """Validation batches may be smaller than training ones when the split is small; none at all is an error
    found now, not at the first evaluation."""
    val_windows = int(val_data.windows_per_shard(T).sum())
    val_batch = min(cfg.batch_size, val_windows // d.world_size)
    if val_batch == 0:
        raise ValueError(f"the val split of {data_dir} has {val_data.num_tokens:,} tokens: {val_windows} windows of "
                         f"block_size + 1 = {T + 1} tokens, fewer than one per process ({d.world_size}); prepare "
                         "more validation text (--val or --val_fraction) or lower --block_size")
    return val_batch


# -- one optimizer step ----------------------------------------------------------------------------------
def train_step(run: Run, prog: Progress, nan_here: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate, all-reduce, clip, and update unless the loss or gradient is non-finite anywhere.

    Returns (mean loss over ranks, gradient norm) as device tensors; nothing here waits for the device.
    nan_here: fault injection, this rank's loss is made NaN (its gradients stay finite)."""
    cfg, d = run.cfg, run.d
    lr = cfg.lr_at(prog.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: muon_lr / max_lr on the same schedule
    # Dropout randomness is a function of (seed, step, rank): a resumed run draws the same masks.
    torch.manual_seed(cfg.seed + 1_000_003 * (prog.step + 1) + 7919 * d.rank)
    loss_sum = torch.zeros((), device=run.device)
    kw, scale = _loss_kwargs(run)
    for micro in range(run.accum):
        x, y = run.batches.next_batch()
        # Non-final micro-steps keep their gradients local; the last backward all-reduces, bucket by bucket.
        sync = run.ddp.no_sync() if run.ddp is not None and micro < run.accum - 1 else contextlib.nullcontext()
        with sync, torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp != torch.float32):
            loss = run.model(x, y, **kw) * scale
        loss.backward()
        loss_sum += loss.detach()
    if nan_here:
        loss_sum += math.nan
    if d.enabled:  # one small all-reduce: every rank then sees any rank's non-finite loss, and logs the mean
        dist.all_reduce(loss_sum)
        loss_sum /= d.world_size
    params = [p for p in run.raw_model.parameters() if p.grad is not None]
    if cfg.clip > 0:  # the norm is of the all-reduced gradients: the same on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    ok = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)  # one decision, identical on every rank
    _optimizer_step(run.optimizer, ok)
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(prog.step + 1)
    prog.bad_run.add_(1).mul_(~ok)
    torch.maximum(prog.worst_run, prog.bad_run, out=prog.worst_run)
    prog.skipped.add_(~ok)
    return loss_sum, grad_norm


def _loss_kwargs(run: Run) -> tuple[dict, float]:
    """(model kwargs, loss scale) of this step's micro-batches. Plain: the micro-batch mean / accum (every
    micro-batch scores B x T targets). Document-aligned: the micro-batch's summed loss x W / the step's scored
    targets (a host number, a function of the data position): after DDP's mean over ranks, the step's loss
    and gradient are those of one mean over all its targets, whatever W, B and A are."""
    if not run.cfg.doc_aligned:
        return {}, 1.0 / run.accum
    data = run.batches.batches
    return ({"doc_eot": data.data.eot_id, "reduction": "sum"},
            run.d.world_size / max(1, data.step_targets(data.position)))


def _optimizer_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Update when `ok`, on the device: fused AdamW leaves weights, moments and step count as they were when
    `found_inf` is 1 (the mechanism AMP's GradScaler uses); Muon + AdamW keeps Muon's weights and momentum by
    selecting the old ones (storyllama/optim.py)."""
    if isinstance(optimizer, MuonAdamW):
        optimizer.step(ok)
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~ok).float()
        optimizer.step()
    elif bool(ok):  # unfused optimizers (other devices) need the host to decide
        optimizer.step()


def _host(run: Run, purpose: str, *tensors: torch.Tensor) -> list[float]:
    """The one place the loop reads device values back (a sync); counted per purpose."""
    run.host_reads[purpose] += 1
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()


# -- the loop ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, args: argparse.Namespace, on_ddp=None) -> dict:
    """Run training; returns a summary (steps, best validation loss, the trained unwrapped model).

    on_ddp: called with the DistributedDataParallel module once it exists (e.g. to register a comm hook)."""
    d, device = init_distributed(cfg.device)
    stop = StopFlag()
    stop.install()
    lock = None
    try:
        cfg, ckpt, state = resolve_config(cfg, args)
        if cfg.eval_only:
            return _eval_only(cfg, args, d, device, ckpt, state)
        if ckpt is not None and state.get("step", 0) >= cfg.total_iters:
            if d.master:
                log.info("%s is complete: step %d of %d (best validation loss %.4f); nothing to do. To train "
                         "further, pass a larger --total_iters", cfg.out, state["step"], cfg.total_iters,
                         state.get("best_val_loss", math.nan))
            return {"step": state["step"], "complete": True, "run_dir": cfg.out}
        if d.master:
            if cfg.wandb:
                check_wandb_login()
            lock = DirLock(cfg.out, "bin/train").acquire()  # one writer per run directory
        run = build_run(cfg, args, d, device, ckpt, state)
        if run.ddp is not None and on_ddp is not None:
            on_ddp(run.ddp)
        return _loop(run, Progress.start(state, device), stop, resumed=ckpt is not None)
    finally:
        stop.restore()
        if lock is not None:
            lock.release()
        destroy()


def _loop(run: Run, prog: Progress, stop: StopFlag, resumed: bool) -> dict:
    cfg, d = run.cfg, run.d
    metrics = _start_outputs(run, prog.step, resumed) if d.master else None
    faults = Faults.from_env()
    run.model.train()
    bar = tqdm(total=cfg.total_iters, initial=prog.step, disable=not d.master, dynamic_ncols=True, unit="step",
               file=sys.stderr)
    clock = {"start": time.time(), "log": time.time(), "log_step": prog.step, "saved": time.time()}
    stopped_by = None
    dropout_on = None
    try:
        while prog.step < cfg.total_iters:
            if dropout_on != (prog.step >= cfg.dropout_start):  # --dropout_start: set at the start and the switch
                dropout_on = prog.step >= cfg.dropout_start
                run.raw_model.set_dropout(dropout_on)
            loss, grad_norm = train_step(run, prog, nan_here=faults.nan_at(d.rank) == prog.step)
            if faults.fail_at == (d.rank, prog.step):
                raise RuntimeError(f"injected failure on rank {d.rank} at step {prog.step} (STORYLLAMA_TEST_FAIL_AT, "
                                   f"unix time {time.time():.3f})")
            prog.step += 1
            prog.tokens_seen += run.tokens_per_step
            bar.update(1)
            final = prog.step == cfg.total_iters
            local = [_local_stop_code(stop, cfg, clock["start"]), _save_due(cfg, clock)]
            stop_code, save_due = 0, 0
            if prog.step % cfg.log_interval == 0 or final:
                report(run, prog, loss, grad_norm, metrics, bar, clock)
                stop_code, save_due = agree(local, d, run.device)
            elif not d.enabled:  # one process: nothing to agree on, so no collective and no sync
                stop_code, save_due = local
            stopped_by = STOP_REASONS[stop_code]
            final = final or stopped_by is not None
            is_best = False
            if prog.step % cfg.eval_interval == 0 or final:
                is_best = evaluate_and_log(run, prog, metrics)
            if prog.step % cfg.save_interval == 0 or final or (is_best and cfg.keep_best) or save_due:
                path = save(run, prog, is_best=is_best and cfg.keep_best)
                clock["saved"] = time.time()
                if d.master:
                    bar.write(f"checkpoint: {path}")
            if stopped_by is not None:
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return _finish(run, prog, stopped_by)


def _local_stop_code(stop: StopFlag, cfg: TrainConfig, t_start: float) -> int:
    if stop.signum is not None:
        return 1
    if cfg.max_time is not None and time.time() - t_start >= cfg.max_time:
        return 2
    return 0


def _save_due(cfg: TrainConfig, clock: dict) -> int:
    return int(cfg.save_every_minutes is not None and time.time() - clock["saved"] >= 60 * cfg.save_every_minutes)


def _start_outputs(run: Run, step: int, resumed: bool) -> Metrics:
    """Rank 0: the run directory's tokenizer copy, config.json and the metrics writer; say what runs."""
    cfg, mcfg, d = run.cfg, run.mcfg, run.d
    for fname in checkpoint.TOKENIZER_FILES:
        if (run.data_dir / fname).is_file():
            shutil.copy2(run.data_dir / fname, run.run_dir / fname)
    (run.run_dir / "config.json").write_text(json.dumps({"model": asdict(mcfg), "train": asdict(cfg)}, indent=2))
    log.info("model: %s, %.2fM parameters (%s tied embeddings), context %d, vocab %d", cfg.preset,
             mcfg.num_params() / 1e6, "with" if mcfg.tie_embeddings else "without", mcfg.block_size, mcfg.vocab_size)
    log.info("device %s x %d, %s, %s; %d tokens/step = %d x %d x %d ranks x %d accumulation", run.device,
             d.world_size, str(run.amp).replace("torch.", ""), run.describe, run.tokens_per_step, cfg.batch_size,
             mcfg.block_size, d.world_size, run.accum)
    log.info("%s %d steps (from step %d) into %s", "resuming" if resumed else "training", cfg.total_iters,
             step, run.run_dir)
    return Metrics(run.run_dir, cfg, mcfg)


def report(run: Run, prog: Progress, loss: torch.Tensor, grad_norm: torch.Tensor, metrics: Metrics | None, bar,
           clock: dict) -> None:
    """The log step: one host read of the loss, the norm and the skip counters; log them; stop the run after
    --max_bad_steps non-finite steps in a row."""
    cfg = run.cfg
    loss_v, norm_v, skipped, worst = _host(run, "report", loss, grad_norm, prog.skipped, prog.worst_run)
    prog.skipped.zero_()
    prog.worst_run.copy_(prog.bad_run)
    if skipped and run.d.master:
        log.warning("step %d: non-finite loss or gradient; %d update(s) skipped since the last report "
                    "(%d/%d in a row)", prog.step, skipped, worst, cfg.max_bad_steps)
    if worst >= cfg.max_bad_steps:
        raise TrainingError(f"{int(worst)} non-finite steps in a row by step {prog.step}; stopping. "
                            f"{_kept(run)} Lower --max_lr or check the data")
    now = time.time()
    tps = (prog.step - clock["log_step"]) * run.tokens_per_step / max(now - clock["log"], 1e-9)
    clock["log"], clock["log_step"] = now, prog.step
    if metrics is None:
        return
    rec = {"step": prog.step, "loss": loss_v, "lr": cfg.lr_at(prog.step - 1), "grad_norm": norm_v,
           "tokens": prog.tokens_seen, "tok_per_s": tps, "elapsed_s": now - clock["start"], "time": now}
    post = {"loss": f"{loss_v:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{tps:,.0f}"}
    peak = peak_flops(run.device)
    if peak:
        rec["mfu"] = run.mcfg.flops_per_token() * tps / (peak * run.d.world_size)
        post["mfu"] = f"{100 * rec['mfu']:.1f}%"
    bar.set_postfix(post, refresh=False)
    metrics.train(rec)


def _kept(run: Run) -> str:
    """What is kept, truthfully: the newest checkpoint (all saved weights are finite), or that there is none."""
    try:
        ckpt = checkpoint.resolve(run.run_dir)
    except checkpoint.CheckpointError:
        return "No checkpoint was written by this run, so nothing of it is kept."
    return f"The last good checkpoint is kept: {ckpt}."


# -- evaluation and checkpoints --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, cfg: TrainConfig, batch_size: int, block_size: int,
             device: torch.device, amp: torch.dtype, d: Dist) -> torch.Tensor:
    """Mean validation loss over the first eval_iters batches of each rank, averaged over ranks (a device
    tensor). --doc_aligned: the same windows, scored with document masking (each story from its own start)."""
    kw = {"doc_eot": data.eot_id} if cfg.doc_aligned else {}
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses, batches)
    for x, y in val_batches(data, batch_size, block_size, d.rank, d.world_size, cfg.eval_iters or None):
        with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
            loss = model(x.to(device), y.to(device), **kw)
        total[0] += loss.double()
        total[1] += 1
    if d.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return total[0] / total[1]


def evaluate_and_log(run: Run, prog: Progress, metrics: Metrics | None) -> bool:
    """Evaluate (the EMA weights too, with --ema_decay), log, sample a story (rank 0); True when this is the best
    validation loss so far. With an EMA, `best` goes by the EMA's loss: those are the weights sample and
    export use."""
    losses = [evaluate(m, run.val_data, run.cfg, run.val_batch, run.mcfg.block_size, run.device, run.amp, run.d)
              for m in (run.model, *([run.ema.module] if run.ema is not None else []))]
    vals = _host(run, "eval", *losses)
    val = vals[-1]  # the loss that picks `best`: the EMA's when there is one
    is_best = val < prog.best_val
    prog.best_val = min(prog.best_val, val)
    if metrics is not None:
        bpb = [v / math.log(2) / bytes_per_token(run.meta, "val") for v in vals]
        rec = {"step": prog.step, "val_loss": vals[0], "val_bpb": bpb[0], "tokens": prog.tokens_seen}
        ema = ""
        if run.ema is not None:
            rec.update(val_loss_ema=vals[1], val_bpb_ema=bpb[1])
            ema = f"; EMA {vals[1]:.4f}, {bpb[1]:.4f} bits per byte"
        log.info("step %d: val loss %.4f, %.4f bits per byte%s%s", prog.step, vals[0], bpb[0], ema,
                 " (best)" if is_best else "")
        if run.cfg.sample_tokens > 0:
            rec["sample"] = sample_text(run)  # bin/serve's Watch tab shows the latest
            log.info("  sample: %s", rec["sample"].replace("\n", " "))
        metrics.val(rec)
    return is_best


def sample_text(run: Run) -> str:
    """A story from the current weights, sampled on a copy of the model: the KV cache the sampler attaches
    never touches the module being trained (its compiled graph keeps its guards)."""
    from storyllama.config import SampleConfig
    from storyllama.sample import generate

    cfg = run.cfg
    enc = _encoding(str(run.data_dir))
    prompt = enc.encode_ordinary(cfg.prompt)
    room = run.mcfg.block_size - len(prompt)
    if room <= 0:
        return "(prompt longer than the context: no sample)"
    scfg = SampleConfig(prompt=[cfg.prompt], max_new_tokens=min(cfg.sample_tokens, room), temperature=cfg.temperature,
                        top_k=50, seed=cfg.seed)
    sampler = copy.deepcopy(run.ema.module if run.ema is not None else run.raw_model).eval()  # what bin/sample uses
    out = generate(sampler, [prompt], scfg, eot_id=enc.eot_token, vocab_limit=enc.n_vocab)
    return cfg.prompt + enc.decode([t for t in out[0] if t < enc.n_vocab and t != enc.eot_token])


@functools.lru_cache(maxsize=2)
def _encoding(data_dir: str):
    """The data's tokenizer, read once per run rather than at every evaluation."""
    from storyllama.data_prep.tokenizer import load_encoding

    return load_encoding(data_dir)


def save(run: Run, prog: Progress, is_best: bool = False) -> Path | None:
    """Rank 0 writes the checkpoint (never non-finite weights); every rank's data position goes with it."""
    cfg, d = run.cfg, run.d
    # Every rank holds the same weights, so every rank takes this decision alike (no rank waits for another).
    if not _host(run, "save", _all_finite(run.raw_model))[0]:
        raise TrainingError(f"the weights are non-finite at step {prog.step} (is --max_lr {cfg.max_lr} too high?); "
                            f"they were not saved. {_kept(run)}")
    path = None
    if d.master:
        st = {"step": prog.step, "tokens_seen": prog.tokens_seen, "best_val_loss": prog.best_val,
              "world_size": d.world_size, "data": run.batches.batches.state_dict(),
              "train_config": asdict(cfg), "model_config": asdict(run.mcfg),
              "tokenizer_sha256": run.meta["tokenizer"].get("sha256")}
        try:
            path = checkpoint.save(run.run_dir, prog.step, run.raw_model, run.optimizer, st, run.data_dir,
                                   cfg.keep_last, is_best, ema=run.ema.module if run.ema is not None else None)
        except checkpoint.CheckpointWriteError as e:
            raise TrainingError(f"could not write a checkpoint: {e}. Earlier checkpoints are untouched; fix that "
                                "(free disk space, permissions) or choose another --out, then --resume auto") from e
    barrier(d)
    return path


def _all_finite(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()


def _eval_only(cfg: TrainConfig, args: argparse.Namespace, d: Dist, device: torch.device, ckpt: Path | None,
               state: dict) -> dict:
    if ckpt is None:
        raise ValueError("--eval_only needs a checkpoint: --resume CKPT_DIR (or --resume auto with --out RUN_DIR)")
    run = build_run(cfg, args, d, device, ckpt, state)
    out = {"step": state.get("step", 0), "model": run.raw_model}
    for suffix, model in (("", run.model), ("_ema", run.ema.module if run.ema is not None else None)):
        if model is None:
            continue
        val = evaluate(model, run.val_data, replace(run.cfg, eval_iters=0), run.val_batch, run.mcfg.block_size, device,
                       run.amp, d).item()
        out[f"val_loss{suffix}"], out[f"val_bpb{suffix}"] = val, val / math.log(2) / bytes_per_token(run.meta, "val")
        if d.master:
            log.info("%s%s on the whole val split of %s (%d tokens): loss %.4f, %.4f bits per byte", ckpt,
                     " (EMA weights)" if suffix else "", run.data_dir, run.val_data.num_tokens, val,
                     out[f"val_bpb{suffix}"])
    return out


def _finish(run: Run, prog: Progress, stopped_by: str | None) -> dict:
    bpb = prog.best_val / math.log(2) / bytes_per_token(run.meta, "val")
    if run.d.master:
        if stopped_by is not None:
            log.info("stopped by %s at step %d; checkpoint saved. Continue with: bin/train --out %s --resume auto",
                     stopped_by, prog.step, run.run_dir)
        log.info("done: best val loss %.4f (%.4f bits per byte); checkpoints in %s, metrics %s, plot %s",
                 prog.best_val, bpb, run.run_dir / "checkpoints", run.run_dir / "metrics.jsonl",
                 run.run_dir / "loss.png")
    return {"step": prog.step, "tokens_seen": prog.tokens_seen, "best_val_loss": prog.best_val,
            "run_dir": str(run.run_dir), "best_val_bpb": bpb, "stopped_by": stopped_by, "model": run.raw_model,
            "host_reads": dict(run.host_reads)}


@dataclass(frozen=True)
class Faults:
    """Fault injection for the reliability tests, read once from the environment:
    STORYLLAMA_TEST_FAIL_AT="RANK:STEP" raises on that rank at that step (not after a torchrun restart);
    STORYLLAMA_TEST_NAN_AT="STEP"
    (every rank) or "RANK:STEP" (that rank only) makes that step's loss NaN."""

    fail_at: tuple[int, int] | None = None
    nan: tuple[int | None, int] | None = None

    @classmethod
    def from_env(cls) -> Faults:
        # the injected failure happens on the first launch only: a torchrun restart then runs clean
        fail = os.environ.get("STORYLLAMA_TEST_FAIL_AT") if restart_count() == 0 else None
        nan = os.environ.get("STORYLLAMA_TEST_NAN_AT")
        nan_at = None
        if nan:
            parts = [int(p) for p in nan.split(":")]
            nan_at = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
        return cls(tuple(map(int, fail.split(":"))) if fail else None, nan_at)

    def nan_at(self, rank: int) -> int | None:
        if self.nan is None or self.nan[0] not in (None, rank):
            return None
        return self.nan[1]


# -- command line --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="bin/train", description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, TrainConfig, prefix_help="training")
    add_dataclass_args(p, ModelConfig, prefix_help="model (overrides the preset)")
    return p


def parse_config(argv: list[str] | None) -> tuple[TrainConfig, argparse.Namespace]:
    """The flags given, checked (ValueError says which to change). A resumed run fills the rest from its
    checkpoint (resolve_config); a new run from the defaults."""
    args = build_parser().parse_args(argv)
    tc = given(args, TrainConfig)
    if "epochs" in tc and "total_iters" in tc:
        raise ValueError(f"give --epochs ({tc['epochs']}) or --total_iters ({tc['total_iters']}), not both: each sets "
                         "the length of the run")
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in tc.items() if k in names}), args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks
    out = None
    try:
        cfg, args = parse_config(argv)
        out = cfg.out
        checkpoint.trust_unverified(cfg.trust_unverified)
        train(cfg, args)
    except (ValueError, TrainingError) as e:  # CheckpointError, DataError, LockedError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # read-only or missing directories, a full disk outside a checkpoint, ...
        print(f"error: {e.strerror or e} ({e.filename or out}). Fix that path or its permissions, then run again "
              "(with --resume auto to continue from the last complete checkpoint)", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(f"error: out of memory on the GPU ({str(e).splitlines()[0]}); lower --batch_size (the micro batch) "
              "and keep --total_batch_size: accumulation makes up the difference", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
