"""Processes and their agreement: torchrun's process group, and the decisions every rank must take alike.

    d, device = init_distributed("auto")     # one process, or join torchrun's group (NCCL / gloo)
    ...
    reason = agree_stop(local_reason, d, device)   # any rank's reason stops every rank
    destroy(d)

A plain `python bin/train` is one process without a group; under torchrun (even with one process) the
group is created and destroyed here.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from storyllama.devices import resolve_device

# Why a run stops early, as a code every rank can all-reduce (the largest code wins).
STOP_REASONS = {0: None, 1: "a signal (SIGTERM/SIGINT)", 2: "the time budget (--max_time)"}


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process: DDP and the collectives below are on."""
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        device = resolve_device(device_arg)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = resolve_device(device_arg, local_rank=d.local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("STORYLLAMA_DIST_TIMEOUT", "300")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, device_id=device if use_cuda else None)
    return d, device


def destroy() -> None:
    """Leave the process group if one was created (torchrun with one process included)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree_stop(code: int, d: Dist, device: torch.device) -> str | None:
    """Every rank's stop code -> one decision for all (a host sync: call it every few steps, not every step)."""
    if d.enabled:
        t = torch.tensor([code], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        code = int(t.item())
    return STOP_REASONS[code]


def gather_objects(obj, d: Dist) -> list:
    """`obj` of every rank, in rank order, on every rank (a collective: all ranks call it)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


class StopFlag:
    """SIGTERM / SIGINT ask the loop to finish the current step, checkpoint and exit 0."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

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
