"""What a run reports: RUN/metrics.jsonl, RUN/loss.png, Weights & Biases when asked, and MFU.

Only rank 0 makes a `Metrics`; the other ranks log nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from storyllama.config import ModelConfig, TrainConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by GPU name (spec sheets), for MFU; STORYLLAMA_PEAK_TFLOPS overrides.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "GH200": 989.4e12, "A100": 312e12,
                   "L40S": 362.1e12, "A10G": 70e12, "L4": 121e12, "4090": 165.2e12}


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak FLOP/s, or None where unknown (no MFU then)."""
    if device.type != "cuda":
        return None
    if os.environ.get("STORYLLAMA_PEAK_TFLOPS"):
        return float(os.environ["STORYLLAMA_PEAK_TFLOPS"]) * 1e12
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Metrics:
    """Appends records to metrics.jsonl, redraws loss.png at every evaluation, mirrors both to W&B."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, mcfg: ModelConfig):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        end_on_a_new_line(self.path)
        self.wandb_run = init_wandb(cfg, mcfg, run_dir) if cfg.wandb else None

    def train(self, rec: dict) -> None:
        self._append(rec)
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def val(self, rec: dict) -> None:
        self._append(rec)
        plot_losses(self.path, self.run_dir / "loss.png")
        if self.wandb_run is not None:
            names = {"val_loss": "val/loss", "val_bpb": "val/bpb", "val_loss_ema": "val/loss_ema",
                     "val_bpb_ema": "val/bpb_ema"}
            self.wandb_run.log({v: rec[k] for k, v in names.items() if k in rec}, step=rec["step"])

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def _append(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def end_on_a_new_line(path: Path) -> None:
    """Before appending: a file whose last record was torn (a kill or a full disk mid-append) gets its newline, so
    the next record starts on a line of its own and the torn one stays a single skippable line."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                log.warning("%s ends in a torn record (from a killed or interrupted run); it is skipped, and new "
                            "records start on the next line", path)
                f.write(b"\n")
    except FileNotFoundError:
        return


def _usable(rec) -> bool:
    """A record the readers can use: an object with a whole step >= 0 and numbers where the losses are."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return (isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)
            and rec["step"] >= 0 and all(num(rec[k]) for k in ("loss", "val_loss") if k in rec))


def read_records(path: Path, start: int = 0, warn: bool = True) -> tuple[list[dict], int]:
    """The records of a JSONL file (metrics.jsonl) from byte `start` on, and the offset after its last complete
    line, so a reader that calls again reads only what was appended. A line that is not a JSON object with a whole
    step and numeric losses (torn by a kill, or damaged) is skipped with a warning naming the file and line; an
    unfinished last line (no newline yet) is left for the next call."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return [], start
    end = data.rfind(b"\n") + 1  # complete lines only
    out = []
    for i, line in enumerate(data[:end].splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            rec = None
        if _usable(rec):
            out.append(rec)
        elif warn:
            where = f"line {i + 1}" if start == 0 else f"a line after byte {start}"
            log.warning("%s: %s is not a JSON record (torn or damaged); skipped", path, where)
    return out, start + end


def check_wandb_login() -> None:
    """Before anything is written: online W&B logging needs credentials; say how to get them (or go offline)."""
    mode = os.environ.get("WANDB_MODE", "online")
    if mode not in ("offline", "disabled", "dryrun") and not _wandb_has_key():
        raise ValueError("--wandb needs a Weights & Biases login: run `wandb login` (or set WANDB_API_KEY), or log "
                         "locally with WANDB_MODE=offline and upload later with `wandb sync`")


def init_wandb(cfg: TrainConfig, mcfg: ModelConfig, run_dir: Path):
    """A W&B run, or ValueError saying what to do when it cannot start."""
    import wandb

    check_wandb_login()
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or run_dir.name, dir=str(run_dir),
                          config={"model": asdict(mcfg), "train": asdict(cfg)})
    except Exception as e:  # wandb's own error types (network, auth, ...)
        raise ValueError(f"--wandb: Weights & Biases did not start ({str(e).splitlines()[0]}); set "
                         "WANDB_MODE=offline to log locally, or drop --wandb") from None


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        rc = netrc.netrc(os.environ.get("NETRC"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for r in read_records(metrics_path, warn=False)[0]:  # the trainer warned once, at its start
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
