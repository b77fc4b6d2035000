"""Checkpoints: one directory per save, written to a temporary name and renamed when complete.

    RUN_DIR/checkpoints/step_000500/
        model.safetensors     the unwrapped model's weights (plain state dict)
        model_config.json     ModelConfig as JSON: the weights load without the training code's classes
        optimizer.pt          optimizer state
        trainer_state.json    step, tokens seen, data position, both configs, best validation loss
                              (random state needs no file: dropout is seeded from (seed, step, rank))
        meta.json, tokenizer.tiktoken   the data's tokenizer, so a checkpoint samples on its own
    RUN_DIR/checkpoints/latest         a text file naming the newest complete checkpoint
    RUN_DIR/checkpoints/best           the same, for the lowest validation loss (when kept)

Only complete directories ever carry the `step_` name; `latest` is replaced atomically after the
rename, so a process killed at any moment leaves the previous checkpoint whole and pointed to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from storyllama.config import ModelConfig

log = logging.getLogger(__name__)

WEIGHTS, MODEL_CONFIG, OPTIMIZER, STATE = "model.safetensors", "model_config.json", "optimizer.pt", "trainer_state.json"
TOKENIZER_FILES = ("meta.json", "tokenizer.tiktoken", "tokenizer.json")  # whichever the data has


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial or does not fit what is asked of it."""


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
         state: dict, data_dir: str | Path | None = None, keep_last: int = 3, is_best: bool = False) -> Path:
    """Write checkpoint `step_NNNNNN` atomically, point `latest` (and `best`) at it, prune old ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    final = ckpt_root / name
    for stale in ckpt_root.glob(".tmp_*"):  # left by a save that was killed: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f".tmp_{name}_{os.getpid()}"
    tmp.mkdir()
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / WEIGHTS))
        cfg: ModelConfig = model.cfg
        (tmp / MODEL_CONFIG).write_text(json.dumps(cfg.__dict__, indent=2) + "\n")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            src = Path(data_dir or "") / fname
            if data_dir is not None and src.is_file():
                shutil.copy2(src, tmp / fname)
        _pause_for_tests(name)
        for f in tmp.iterdir():  # durable before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a re-save of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # A full disk surfaces as OSError from some writers and RuntimeError from torch.save's zip writer.
        free = shutil.disk_usage(ckpt_root).free
        raise OSError(f"writing checkpoint {final} failed ({e}); {free / 1e6:.1f} MB free on that disk") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_pointer(ckpt_root / "latest", name)
    if is_best:
        _write_pointer(ckpt_root / "best", name)
    _prune(ckpt_root, keep_last)
    return final


def _prune(ckpt_root: Path, keep_last: int) -> None:
    keep = {_read_pointer(ckpt_root / p) for p in ("latest", "best")}
    steps = sorted(p.name for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        if old not in keep:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)


def _read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def resolve(path: str | Path, which: str = "latest") -> Path:
    """A run directory -> its `latest` (or `best`) checkpoint; a checkpoint directory -> itself."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        ckpt = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        name = _read_pointer(root / which)
        if name is None:
            raise CheckpointError(f"no complete checkpoint in {path}: expected {root / which} naming one "
                                  "(train first, or pass a checkpoint directory with --checkpoint)")
        ckpt = root / name
    for fname in (WEIGHTS, MODEL_CONFIG):
        if not (ckpt / fname).is_file():
            raise CheckpointError(f"checkpoint {ckpt} is incomplete: {fname} is missing")
    return ckpt


def load_model_config(ckpt: Path) -> ModelConfig:
    return ModelConfig(**json.loads((ckpt / MODEL_CONFIG).read_text()))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for cut or corrupt files
        raise CheckpointError(f"cannot read {ckpt / WEIGHTS}: {e}; the file is damaged, use an earlier "
                              "checkpoint") from e
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / WEIGHTS} does not fit this model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               kernels: str = "reference"):
    """Load a checkpoint (or a run's latest) for inference: returns (model in eval mode, ckpt dir)."""
    from storyllama.model import Llama

    ckpt = resolve(path)
    model = Llama(load_model_config(ckpt), kernels=kernels)
    load_weights(model, ckpt)
    model.to(device=device, dtype=dtype).eval()
    return model, ckpt


def load_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: Path) -> None:
    optimizer.load_state_dict(torch.load(ckpt / OPTIMIZER, map_location="cpu", weights_only=True))
