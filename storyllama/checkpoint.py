"""Checkpoints: one directory per save, written to a temporary name and renamed when complete.

    RUN_DIR/checkpoints/step_000500/
        model.safetensors     the unwrapped model's weights (plain state dict)
        model_ema.safetensors with --ema_decay: the averaged weights, same names (what sample/export use)
        model_config.json     ModelConfig as JSON: the weights load without the training code's classes
        optimizer.pt          optimizer state
        trainer_state.json    step, tokens seen, data position, both configs, best validation loss
                              (random state needs no file: dropout is seeded from (seed, step, rank))
        meta.json, tokenizer.tiktoken   the data's tokenizer, so a checkpoint samples on its own
        checksums.json        sha256 of every other file, checked when a file is loaded
    RUN_DIR/checkpoints/latest         a text file naming the newest complete checkpoint
    RUN_DIR/checkpoints/best           the same, for the lowest validation loss (when kept)

Only complete directories ever carry the `step_` name, and a complete directory is never replaced in
place: a second save of the same step (after resuming from an older checkpoint) takes the name
`step_NNNNNN.1` (.2, ...). `latest` is replaced atomically after the rename and names a complete
checkpoint at every instant, so a process killed at any moment leaves one whole and pointed to.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storyllama.config import ModelConfig
from storyllama.data_prep.tokenizer import TokenizerError, file_sha256, tokenizer_entry
from storyllama.inputs import InputError, Whole, read_json
from storyllama.inputs import field as input_field

log = logging.getLogger(__name__)

WEIGHTS, MODEL_CONFIG, OPTIMIZER, STATE = "model.safetensors", "model_config.json", "optimizer.pt", "trainer_state.json"
CHECKSUMS = "checksums.json"
EMA_WEIGHTS = "model_ema.safetensors"
WEIGHT_CHOICES = ("auto", "ema", "raw")  # auto: the EMA weights when the checkpoint has them, else the raw ones
TOKENIZER_FILES = ("meta.json", "tokenizer.tiktoken", "tokenizer.json")  # whichever the data has
_NAME = re.compile(r"step_(\d+)(?:\.(\d+))?$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, damaged or does not fit what is asked of it."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed for an I/O reason (disk full, permissions, ...); the message says which."""


def step_of(name: str) -> tuple[int, int] | None:
    """(step, re-save number) of a checkpoint directory name, or None for anything else."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _write_pointer(path: Path, name: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(name + "\n")
    os.replace(tmp, path)


def _pause_for_tests(name: str) -> None:
    # Fault-injection hook: with STORYLLAMA_TEST_PAUSE_IN_SAVE=step_NNNNNN the save of that checkpoint
    # stops, its files written but not yet renamed, so a test can SIGKILL the process right there.
    if os.environ.get("STORYLLAMA_TEST_PAUSE_IN_SAVE") == name:
        print(f"STORYLLAMA_TEST_PAUSED {name}", flush=True)
        time.sleep(3600)


def save(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict, data_dir: str | Path | None = None, keep_last: int = 3, is_best: bool = False,
         ema: torch.nn.Module | None = None) -> Path:
    """Write checkpoint `step_NNNNNN` atomically, point `latest` (and `best`) at it, prune old ones; `ema`, the
    averaged model, goes to model_ema.safetensors.

    Raises CheckpointWriteError when the files cannot be written (the message says why, with the free
    space when the disk is full); earlier checkpoints and the pointers are untouched then."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = _free_name(ckpt_root, step)
    final = ckpt_root / name
    for stale in ckpt_root.glob(".tmp_*"):  # left by a save that was killed: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp_{name}_{os.getpid()}"
    try:
        tmp.mkdir()
        _write_files(tmp, model, optimizer, state, data_dir, ema)
        _pause_for_tests(name)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointWriteError(_write_failure_message(final, e, ckpt_root)) from e
        raise
    _write_pointer(ckpt_root / "latest", name)
    if is_best:
        _write_pointer(ckpt_root / "best", name)
    _prune(ckpt_root, keep_last)
    return final


def _free_name(ckpt_root: Path, step: int) -> str:
    """step_NNNNNN, or step_NNNNNN.K for the first free K when that step was saved before (never replace a
    complete checkpoint in place: `latest` may name it)."""
    name, k = f"step_{step:06d}", 0
    while (ckpt_root / name).exists():
        k += 1
        name = f"step_{step:06d}.{k}"
    return name


def _write_files(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
                 data_dir: str | Path | None, ema: torch.nn.Module | None = None) -> None:
    for module, fname in ((model, WEIGHTS), (ema, EMA_WEIGHTS)):
        if module is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(tmp / fname))
    cfg: ModelConfig = model.cfg
    (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.__dict__, indent=2) + "\n")
    if optimizer is not None:
        # Serialised in memory, then written by Python: a failed write (a full disk) is then an OSError that
        # says so, where torch.save's zip writer reports it as an unrelated RuntimeError.
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        (tmp / OPTIMIZER).write_bytes(buf.getbuffer())
    (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    for fname in TOKENIZER_FILES:
        src = Path(data_dir or "") / fname
        if data_dir is not None and src.is_file():
            shutil.copy2(src, tmp / fname)
    write_checksums(tmp)
    for f in tmp.iterdir():  # durable before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_checksums(ckpt: Path) -> None:
    """checksums.json: the sha256 of every file in `ckpt` (any tool that writes a checkpoint calls this last)."""
    sums = {f.name: file_sha256(f) for f in sorted(ckpt.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (ckpt / CHECKSUMS).write_text(json.dumps(sums, indent=2) + "\n")


# Checkpoints without checksums.json (or with a file it does not list) are refused unless the user says to trust
# them: `--trust_unverified` on every tool that reads checkpoints sets this (storyllama.config.add_trust_flag).
_TRUST_UNVERIFIED = False


TRUST_HELP = ("use checkpoints that have no checksums.json (made by hand or by an older version): a damaged file "
              "then loads unseen (default: refused)")


def add_trust_flag(parser) -> None:
    """--trust_unverified, for the tools that read checkpoints (they call trust_unverified(ns.trust_unverified))."""
    parser.add_argument("--trust_unverified", action="store_true", help=TRUST_HELP)


def trust_unverified(on: bool = True) -> None:
    global _TRUST_UNVERIFIED
    _TRUST_UNVERIFIED = bool(on)


def verify(ckpt: Path, fname: str) -> Path:
    """The path of `fname` in `ckpt` after checking it against checksums.json. A checkpoint without checksums, or
    a file they do not list, is refused unless trust_unverified() was called (`--trust_unverified`)."""
    path = ckpt / fname
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
    if (ckpt / CHECKSUMS).exists():
        try:
            expected = read_json(ckpt / CHECKSUMS).get(fname)
        except InputError as e:
            raise CheckpointError(f"{e}; the checkpoint's checksums are damaged, use an earlier checkpoint") from None
    else:
        expected = None
    if expected is None:
        if _TRUST_UNVERIFIED:
            return path
        raise CheckpointError(f"{path} cannot be verified: {ckpt / CHECKSUMS} is missing or does not list it, so a "
                              "damaged file would load unseen; pass --trust_unverified to use it anyway, or use a "
                              "checkpoint that has its checksums")
    if file_sha256(path) != expected:
        raise CheckpointError(f"{path} is damaged: its sha256 differs from the one recorded when it was saved; "
                              "use an earlier checkpoint")
    return path


def verifies(ckpt: Path) -> bool:
    """Whether `ckpt` is a complete checkpoint whose every file matches its checksums.json."""
    try:
        for fname in (WEIGHTS, MODEL_CONFIG):
            verify(ckpt, fname)
        sums = read_json(ckpt / CHECKSUMS) if (ckpt / CHECKSUMS).is_file() else {}
        for fname in sums:
            verify(ckpt, fname)
    except (CheckpointError, OSError, ValueError, AttributeError):
        return False
    return True


def _write_failure_message(final: Path, e: OSError, ckpt_root: Path) -> str:
    reason = e.strerror or str(e)
    try:
        free = shutil.disk_usage(ckpt_root).free
    except OSError:
        free = None
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    where = f"; {free / 1e6:.1f} MB free on that disk" if full and free is not None else ""
    return f"writing checkpoint {final} failed: {reason}{where}"


def _prune(ckpt_root: Path, keep_last: int) -> None:
    """Keep the newest keep_last checkpoints by step (and whatever `latest`/`best` name)."""
    keep = {read_pointer(ckpt_root / p) for p in ("latest", "best")}
    found = sorted((step_of(p.name), p.name) for p in ckpt_root.iterdir() if p.is_dir() and step_of(p.name))
    for _, old in found[:-keep_last]:
        if old not in keep:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)


def read_pointer(path: Path) -> str | None:
    """The checkpoint a pointer file (`latest`, `best`) names, or None: a pointer is only ever a checkpoint name of
    its own run (`step_NNNNNN`), never a path, so one that names anything else (`../other`, `/abs`) is ignored."""
    try:
        name = path.read_text(errors="replace").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        log.warning("%s cannot be read (%s); ignored", path, e.strerror or e)
        return None
    if not name:
        return None
    if step_of(name) is None:
        log.warning("%s does not name a checkpoint of this run (it must be a step_NNNNNN name); ignored", path)
        return None
    return name


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint directories under a run's checkpoints/, newest (by step, then re-save) first."""
    if not root.is_dir():
        return []
    found = [(step_of(p.name), p) for p in root.iterdir() if step_of(p.name) and p.is_dir() and not p.is_symlink()]
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def has_checkpoints(run_dir: Path) -> bool:
    """Whether a run directory holds any checkpoint directory (complete or not) or a `latest` pointer."""
    root = Path(run_dir) / "checkpoints"
    return (root / "latest").exists() or bool(checkpoint_dirs(root))


def resolve(path: str | Path, which: str = "latest") -> Path:
    """A run directory -> its `latest` (or `best`) checkpoint; a checkpoint directory -> itself.

    The pointer is resolved inside the run only. When it is missing, unusable or names an incomplete checkpoint,
    the newest checkpoint that verifies (every file against its checksums) is taken, and the log says so."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        ckpt = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        name = read_pointer(root / which)
        ckpt = root / name if name is not None else None
        if ckpt is None or not all((ckpt / f).is_file() for f in (WEIGHTS, MODEL_CONFIG)):
            fallback = next((c for c in checkpoint_dirs(root) if verifies(c)), None)
            if fallback is None:
                raise CheckpointError(f"no complete checkpoint in {path}: expected {root / which} naming one "
                                      "(train first, or pass a checkpoint directory with --checkpoint)")
            log.warning("%s %s; using %s, the newest checkpoint that verifies", root / which,
                        "is missing or unusable" if ckpt is None else f"names {name}, which is incomplete",
                        fallback.name)
            ckpt = fallback
    for fname in (WEIGHTS, MODEL_CONFIG):
        if not (ckpt / fname).is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
    return ckpt


def load_model_config(ckpt: Path) -> ModelConfig:
    path = verify(ckpt, MODEL_CONFIG)
    try:
        return ModelConfig(**read_json(path))
    except (ValueError, TypeError) as e:  # not JSON, unknown keys, or values ModelConfig refuses
        raise CheckpointError(f"{path} is not a model configuration this version can use: {e}") from None


def weights_file(ckpt: Path, weights: str = "auto") -> str:
    """The file that `weights` (auto | ema | raw) names in `ckpt`: auto takes the EMA weights when there are some."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    has_ema = (ckpt / EMA_WEIGHTS).is_file()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"checkpoint {ckpt} has no EMA weights ({EMA_WEIGHTS}: the run had no --ema_decay); "
                              "use --weights raw")
    return EMA_WEIGHTS if weights == "ema" or (weights == "auto" and has_ema) else WEIGHTS


def read_weights(ckpt: Path, weights: str = "raw") -> dict[str, torch.Tensor]:
    """The checkpoint's weights (raw, ema, or auto: see weights_file) as a plain state dict (CPU tensors),
    checked against checksums.json."""
    path = verify(ckpt, weights_file(ckpt, weights))
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for cut or corrupt files
        raise CheckpointError(f"cannot read {path}: {e}; the file is damaged, use an earlier checkpoint") from e


def load_weights(model: torch.nn.Module, ckpt: Path, weights: str = "raw") -> None:
    state = read_weights(ckpt, weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ from model_config.json's
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"{ckpt / WEIGHTS} does not match {ckpt / MODEL_CONFIG} ({first}); the checkpoint "
                              "is inconsistent, use another one") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / WEIGHTS} does not fit this model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernels: str = "reference", weights: str = "auto"):
    """Load a checkpoint (or a run's latest) for inference: returns (model in eval mode, ckpt dir). weights:
    auto (the EMA weights when the checkpoint has them, else the raw ones), ema or raw."""
    from storyllama.model import Llama

    ckpt = resolve(path)
    model = Llama(load_model_config(ckpt), kernels=kernels)
    load_weights(model, ckpt, weights)
    if weights_file(ckpt, weights) == EMA_WEIGHTS:
        log.info("%s: using its EMA weights (%s; --weights raw for the trained ones)", ckpt, EMA_WEIGHTS)
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt


# trainer_state.json's fields and their ranges: a field of the wrong type or range is one CheckpointError naming
# it, when the checkpoint is opened, before a step is trained (the values then go into TrainConfig / ModelConfig,
# which check theirs, and into the data stream).
_STATE_NUMBERS = {"step": Whole(0, 10**12), "tokens_seen": Whole(0, 2**62)}
_DATA_NUMBERS = {"windows": Whole(0, 2**62), "windows_per_step": Whole(1, 2**40), "position": Whole(0, 2**62),
                 "world_size": Whole(1, 1 << 20), "batch_size": Whole(1, 1 << 20), "seed": Whole(0, 2**64),
                 "block_size": Whole(1, 1 << 20), "num_windows": Whole(0, 2**62)}


def load_state(ckpt: Path) -> dict:
    path = verify(ckpt, STATE)
    try:
        state = read_json(path)
        for key, rng in _STATE_NUMBERS.items():
            if key in state:
                rng.check(state[key], f"{path}: {key!r}")
        best = state.get("best_val_loss")
        if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or best != best):
            raise InputError(f"{path}: 'best_val_loss' must be a number, got {str(best)[:40]}")
        for key in ("train_config", "model_config", "data"):
            input_field(state, key, path, dict, required=False)
        data = state.get("data")
        if data is not None:
            streams = [data["0"]] if isinstance(data.get("0"), dict) else [data]  # older: one entry per rank
            for stream in streams:
                for key, rng in _DATA_NUMBERS.items():
                    if key in stream:
                        rng.check(stream[key], f"{path}: data {key!r}")
                if "windows" not in stream and not all(k in stream for k in ("position", "world_size", "batch_size")):
                    raise InputError(f"{path}: the data position has neither 'windows' nor the older 'position'")
                if "windows" in stream and "windows_per_step" not in stream:
                    raise InputError(f"{path}: the data position has no 'windows_per_step'")
    except InputError as e:
        raise CheckpointError(f"{e}; the checkpoint's state is damaged, use an earlier checkpoint") from None
    return state


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    path = verify(ckpt, OPTIMIZER)
    try:
        optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"cannot load the optimizer state {path}: {str(e).splitlines()[0]}; the file is "
                              "damaged or from another model, use an earlier checkpoint") from None


def describe(ckpt: Path) -> str:
    """What an exported file says it came from: "RUN, step N" (the run's name and the step), never a path of the
    machine that wrote it. A checkpoint outside a run's checkpoints/ is named by its own directory."""
    real = Path(ckpt).resolve()
    name = real.parent.parent.name if real.parent.name == "checkpoints" else real.name
    try:
        step = _STATE_NUMBERS["step"].check(read_json(real / STATE).get("step"), "step")
    except ValueError:
        parsed = step_of(real.name)
        step = parsed[0] if parsed else None
    return f"{name}, step {step}" if step is not None else name


def tokenizer_info(ckpt: Path) -> dict:
    """The checkpoint's meta.json "tokenizer" entry; an error when it or its file is missing."""
    try:
        tok = tokenizer_entry(ckpt / "meta.json")
    except TokenizerError as e:
        raise CheckpointError(f"checkpoint {ckpt} has no usable meta.json ({e}): the exported model would have no "
                              "tokenizer; copy meta.json and its tokenizer file from the data directory the run was "
                              "trained on") from None
    if not (ckpt / tok.get("file", "tokenizer.tiktoken")).is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {tok.get('file')} (its meta.json names it): the exported "
                              "model would have no tokenizer; copy it from the data directory the run was trained on")
    return tok
