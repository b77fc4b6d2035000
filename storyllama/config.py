"""Passive configuration: ModelConfig, TrainConfig, SampleConfig, the presets, and the command-line
flags generated from them (argparse, one flag per field, plus the seed project's names as aliases).

Nothing here probes hardware or derives run-time values: accumulation steps, dtype and device are
worked out by the trainer once the process group exists.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, get_type_hints

from storyllama.inputs import SEED, Range, Real, Whole


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up to a multiple of 64 (faster matmuls; padded ids never appear)."""
    return ((n + multiple - 1) // multiple) * multiple


# ModelConfig fields that are training choices, not the model's shape: fine-tuning may change them
DROPOUT_RATES = ("dropout", "attn_dropout")


# The type and range of every number of the configurations below, whether it comes from a flag, a checkpoint's
# model_config.json / trainer_state.json or an import (storyllama.inputs: one checker for all of them). The
# bounds are what one machine can hold (a uint16 token id, a 131,072 context), not tuning.
MODEL_LIMITS: dict[str, Range] = {
    "vocab_size": Whole(1, 65_536), "dim": Whole(1, 65_536), "n_layers": Whole(1, 1_024), "n_heads": Whole(1, 1_024),
    "n_kv_heads": Whole(1, 1_024), "block_size": Whole(1, 131_072), "hidden_dim": Whole(1, 262_144),
    "multiple_of": Whole(1, 65_536), "norm_eps": Real(0, 1, low_open=True, high_open=True),
    "rope_theta": Real(0, 1e12, low_open=True), "dropout": Real(0, 1, high_open=True),
    "attn_dropout": Real(0, 1, high_open=True)}
ITERS = Whole(1, 10**9)
TRAIN_LIMITS: dict[str, Range] = {
    "batch_size": Whole(1, 65_536), "total_batch_size": Whole(1, 2**40), "total_iters": ITERS,
    "epochs": Real(0, 1e6, low_open=True), "max_lr": Real(0, 10, low_open=True), "min_lr_ratio": Real(0, 1),
    "warmup_iters": Whole(0, 10**9), "weight_decay": Real(0, 1e6), "beta1": Real(0, 1, high_open=True),
    "beta2": Real(0, 1, high_open=True), "clip": Real(0, 1e9), "muon_lr": Real(0, 10, low_open=True),
    "muon_momentum": Real(0, 1, high_open=True), "muon_weight_decay": Real(0, 1e6),
    "ema_decay": Real(0, 1, high_open=True), "dropout_start": Whole(0, 10**9), "eval_interval": ITERS,
    "eval_iters": Whole(0, 10**7), "log_interval": ITERS, "save_interval": ITERS,
    "save_every_minutes": Real(0, 1e7, low_open=True), "keep_last": Whole(1, 10**6),
    "max_time": Real(0, 1e9, low_open=True), "max_bad_steps": ITERS, "seed": SEED,
    "sample_tokens": Whole(0, 100_000), "temperature": Real(0, 100)}
SAMPLE_LIMITS: dict[str, Range] = {
    "max_new_tokens": Whole(1, 1_000_000), "temperature": Real(0, 100), "top_k": Whole(1, 1_000_000),
    "top_p": Real(0, 1, low_open=True), "repetition_penalty": Real(0, 100, low_open=True),
    "num_samples": Whole(1, 1_024), "num_beams": Whole(1, 1_024), "length_penalty": Real(-100, 100), "seed": SEED}


def check_fields(obj, limits: dict[str, Range], flag_names: bool = False) -> None:
    """Every field of `obj` named in `limits` (None for an optional one is fine) within its range, or one
    ValueError naming it (as --flag when `flag_names`)."""
    optional = {f.name for f in fields(obj) if f.default is None}
    for name, rng in limits.items():
        value = getattr(obj, name)
        if value is None and name in optional:
            continue
        setattr(obj, name, rng.check(value, f"--{name}" if flag_names else name))  # 512.0 from JSON -> 512


@dataclass
class ModelConfig:
    vocab_size: int = 50304  # model vocabulary; taken from the data (padded to a multiple of 64) unless given
    dim: int = 512  # model width (embedding size)
    n_layers: int = 8  # transformer blocks
    n_heads: int = 8  # attention (query) heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
    block_size: int = 512  # context length
    hidden_dim: int | None = None  # SwiGLU width; None: Llama's rule, 8/3 * dim rounded up to multiple_of
    multiple_of: int = 256  # the SwiGLU width is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    dropout: float = 0.0  # on the residual stream: the embeddings and each block's attention and MLP output
    attn_dropout: float = 0.0  # on the attention probabilities (on CPU it costs SDPA's fused kernel)
    tie_embeddings: bool = True  # the LM head shares the token embedding's weights

    def __post_init__(self) -> None:
        if self.hidden_dim is None and isinstance(self.dim, int) and isinstance(self.multiple_of, int) \
                and MODEL_LIMITS["dim"].ok(self.dim) and MODEL_LIMITS["multiple_of"].ok(self.multiple_of):
            h = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        check_fields(self, MODEL_LIMITS)
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}): "
                             "change --dim or --n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                             "for grouped-query attention: change --n_kv_heads")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count from the shape alone (the tests check the model against this formula)."""
        d, hd, L = self.dim, self.head_dim, self.n_layers
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        emb = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return emb + L * per_layer + d + head

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 N + attention's 12 L T d."""
        # Matmul weights: every layer plus the LM head (counted once whether tied or not); the embedding
        # lookup costs no FLOPs.
        n_matmul = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.dim)
        return 6 * n_matmul + 12 * self.n_layers * self.block_size * self.dim


# Presets are data. vocab_size here is a default; the trainer takes the data's (padded to 64) unless
# --vocab_size is given.
PRESETS: dict[str, dict[str, Any]] = {
    # The seed project's model, its values kept. About 50M parameters with tied embeddings.
    "storyllama-88m": dict(vocab_size=50304, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, block_size=512,
                           dropout=0.1),
    # CPU presets: ~1.3M parameters (demo, tests) and ~4.3M (the llama2.c 10-minute recipe's shape).
    "tiny": dict(vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, block_size=256, hidden_dim=384),
    "small": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, block_size=256, hidden_dim=768),
    # llama2.c's shapes, for comparison.
    "stories15m": dict(vocab_size=32000, dim=288, n_layers=6, n_heads=6, n_kv_heads=6, block_size=256,
                       hidden_dim=768),
    "stories42m": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, block_size=1024,
                       hidden_dim=1376),
    "stories110m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, block_size=1024,
                        hidden_dim=2048),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


# The seed project's optimizer settings, which were TrainConfig's defaults until the recipe of README
# "Measured results" (issue 12) replaced them. A checkpoint saved before these fields existed was trained with
# them, and an --init_from fine-tune takes them for every one of these flags it is not given: the fine-tuning
# stages were measured with them, and Muon's fixed-size steps at --muon_lr would move pretrained weights at
# pretraining speed whatever --max_lr says.
SEED_RECIPE: dict[str, Any] = dict(optimizer="adamw", weight_decay=0.1, muon_lr=0.02, muon_weight_decay=0.0,
                                   zero_init=False, ema_decay=0.0)


@dataclass
class TrainConfig:
    data: str = "data/builtin"  # prepared data directory (bin/prepare_data --out)
    out: str = "runs/default"  # run directory: checkpoints, metrics.jsonl, loss.png
    preset: str = "tiny"  # named model shape (tiny, small, storyllama-88m, stories15m, ...)
    # batch and schedule
    batch_size: int = 8  # micro-batch, sequences per process per forward
    total_batch_size: int | None = None  # tokens per optimizer step (all ranks); None: one micro-batch per rank
    total_iters: int = 1000  # optimizer steps
    epochs: float | None = None  # if set, total_iters = epochs * train tokens / total_batch_size
    max_lr: float = 6e-4  # peak learning rate of AdamW (and the schedule's shape for Muon)
    min_lr_ratio: float = 0.1  # cosine decays to max_lr * min_lr_ratio
    warmup_iters: int = 100  # linear warm-up steps before the cosine
    weight_decay: float = 1.0  # decoupled (lr x decay per step); the seed project's 0.1 is SEED_RECIPE's
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    clip: float = 1.0  # gradient-norm clipping; 0: none
    # optimizer and recipe (README, Training: the defaults are the measured recipe; SEED_RECIPE the seed's)
    optimizer: str = "muon"  # adamw | muon (Muon for the blocks' matrices, AdamW for embeddings and norms)
    muon_lr: float = 0.04  # Muon's peak lr, on --max_lr's schedule; torch's "original" per-shape adjustment
    muon_momentum: float = 0.95  # Nesterov momentum of the Muon group
    muon_weight_decay: float = 0.4  # decoupled, on the Muon group (AdamW's groups keep --weight_decay)
    zero_init: bool = True  # a fresh run starts every attention wo and MLP w2 at zero
    ema_decay: float = 0.99  # 0: off; else an exponential moving average of the weights, evaluated and saved
    dropout_start: int = 0  # late dropout: --dropout / --attn_dropout apply from this optimizer step on (0: always)
    # evaluation, logging, checkpoints
    eval_interval: int = 100  # evaluate every this many optimizer steps
    eval_iters: int = 20  # validation batches per eval (0: the whole split)
    log_interval: int = 10  # also how often the host reads the device (loss, skipped steps, the stop agreement)
    save_interval: int = 100  # save a checkpoint every this many optimizer steps
    save_every_minutes: float | None = None  # also save when this much wall time has passed since the last save
    keep_last: int = 3  # checkpoints kept (the newest; latest and best are always kept)
    keep_best: bool = True  # also keep the checkpoint with the lowest validation loss as `best`
    resume: str | None = None  # "auto" or a checkpoint directory
    init_from: str | None = None  # fine-tune: start from this run's (or checkpoint's) weights, fresh optimizer, step 0
    eval_only: bool = False  # evaluate the --resume checkpoint on the whole validation split, then exit
    trust_unverified: bool = False  # resume / fine-tune from a checkpoint that has no checksums.json
    max_time: float | None = None  # stop (with a checkpoint) after this many seconds of training
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops
    # hardware and speed
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda or cuda:N
    dtype: str = "auto"  # auto: bfloat16 autocast on GPUs that support it, float32 on CPU
    compile: bool | None = None  # None: on for CUDA, off for CPU
    kernels: str = "auto"  # auto | triton | reference
    fused_ce: bool | None = None  # None: on (chunked linear + cross-entropy, no full logits)
    seed: int = 1337  # seed of the initialisation, the data order and dropout
    # windows start at story starts; attention and the loss stay inside each story (training and evaluation).
    # None: on for request/story data (a window opens with a request), off for plain text
    doc_aligned: bool | None = None  # story-aligned windows and attention (above); unset: on for request/story data
    # samples printed at each eval
    prompt: str = "Once upon a time"  # prompt of the sample printed at each evaluation
    sample_tokens: int = 64  # 0: no sample at evals
    temperature: float = 0.8  # temperature of that sample
    # Weights & Biases (never required; works with WANDB_MODE=offline)
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without an account)
    wandb_project: str = "storyllama"  # W&B project
    wandb_run_name: str | None = None  # W&B run name; unset: the run directory's name

    def __post_init__(self) -> None:
        check_fields(self, TRAIN_LIMITS, flag_names=True)
        if self.optimizer not in ("adamw", "muon"):
            raise ValueError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to max_lr, then cosine to max_lr * min_lr_ratio at total_iters."""
        min_lr = self.max_lr * self.min_lr_ratio
        if step < self.warmup_iters:
            return self.max_lr * (step + 1) / self.warmup_iters
        if step >= self.total_iters:
            return min_lr
        progress = (step - self.warmup_iters) / max(1, self.total_iters - self.warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - min_lr)


@dataclass
class SampleConfig:
    prompt: list[str] = field(default_factory=lambda: ["Once upon a time"])  # one or more prompts (one batch)
    max_new_tokens: int = 200  # new tokens per story
    temperature: float = 0.8  # 0: greedy
    top_k: int | None = None  # keep the k most likely tokens; unset: off
    top_p: float | None = None  # nucleus sampling: keep the smallest set with this probability; unset: off
    repetition_penalty: float = 1.0  # divide the logits of tokens already in the text by this (1: off)
    num_samples: int = 1  # stories per prompt (beam search: the best beams)
    num_beams: int = 1  # > 1: beam search (deterministic; temperature, top-k and top-p do not apply)
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / length ** length_penalty
    seed: int | None = None  # random seed; unset: a fresh one
    dtype: str = "float32"  # weight dtype: float32 or bfloat16 (halves the bytes read per token)
    compile: bool = False  # compile the decode step (CUDA graphs on CUDA)
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda or cuda:N

    def __post_init__(self) -> None:
        check_fields(self, SAMPLE_LIMITS, flag_names=True)
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise ValueError(f"--num_samples ({self.num_samples}) cannot exceed --num_beams ({self.num_beams}): "
                             "beam search returns at most one story per beam")


# The seed project's flag names, kept usable beside the clear ones.
SEED_ALIASES: dict[str, list[str]] = {
    "block_size": ["--block_size"],
    "dim": ["--embeddings_dims"],
    "n_heads": ["--no_of_heads"],
    "n_kv_heads": ["--no_kv_heads"],
    "n_layers": ["--no_of_decoder_layers"],
    "max_lr": ["--lr"],
    "weight_decay": ["--weight_decay_optim"],
    "beta1": ["--beta_1"],
    "beta2": ["--beta_2"],
    "save_interval": ["--save_checkpoint_iter"],
    "max_new_tokens": ["--max_length"],
    "sample_tokens": ["--max_length"],  # bin/train's samples at each eval
}


LIMITS_OF: dict[type, dict[str, Range]] = {ModelConfig: MODEL_LIMITS, TrainConfig: TRAIN_LIMITS,
                                          SampleConfig: SAMPLE_LIMITS}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                       prefix_help: str = "") -> None:
    """One flag per dataclass field, defaults None (so "given on the command line" is knowable)."""
    hints = get_type_hints(cls)
    comments = field_comments(cls)
    group = parser.add_argument_group(prefix_help or cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        names = [f"--{f.name}"] + SEED_ALIASES.get(f.name, [])
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING
                                                               else None)
        what = comments.get(f.name, "")
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=f"{what} (default: {default})".strip()
                                  .replace("%", "%%"))
        base = _base_type(tp)
        if base is bool:
            # --compile / --no-compile / --compile false all work.
            kw.update(nargs="?", const=True, type=_parse_bool)
            group.add_argument(*names, **kw)
            group.add_argument(f"--no-{f.name}", f"--no_{f.name}", dest=f.name, action="store_false", default=None,
                               help=argparse.SUPPRESS)
            continue
        if base is list:
            kw.update(nargs="+", type=str)
        elif f.name in LIMITS_OF.get(cls, {}):
            kw.update(type=LIMITS_OF[cls][f.name].parse)  # the range is checked (and named) as the flag is read
        else:
            kw.update(type=base)
        group.add_argument(*names, **kw)


def field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing comment in the source (`name: type = default  # what it does`): the help
    text of its flag, so the comment and --help are one text."""
    import inspect

    found = re.findall(r"^    (\w+): [^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M)
    return {name: text.strip() for name, text in found}


def _base_type(tp: Any) -> type:
    args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
    if getattr(tp, "__origin__", None) is list:
        return list
    if args:
        return _base_type(args[0])
    return tp


def given(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names and v is not None}
