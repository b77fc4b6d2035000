"""Processes and their agreement: torchrun's process group, and the decisions every rank must take alike.

    d, device = init_distributed("auto")     # one process, or join torchrun's group (NCCL / gloo)
    ...
    stop, save_due = agree([stop, save_due], d, device)   # any rank's reason holds for every rank
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
    kw = dict(timeout=timeout, device_id=device if use_cuda else None)
    store = _attempt_store(timeout)
    if store is not None:
        kw.update(store=store, rank=d.rank, world_size=d.world_size)
    dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return d, device


def _attempt_store(timeout: datetime.timedelta):
    """torchrun's own key-value store, under a prefix of its own for each restart of the worker group.

    torchrun keeps that store across restarts; without a prefix, the restarted workers' process group read the
    addresses the failed attempt's workers had published there, and gloo timed out connecting to a dead peer
    (seen with --max-restarts on PyTorch 2.13). None outside torchrun's agent store: env:// then."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    return dist.PrefixStore(f"storyllama/attempt_{restart_count()}/", base)


def destroy() -> None:
    """Leave the process group if one was created (torchrun with one process included)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(codes: list[int], d: Dist, device: torch.device) -> list[int]:
    """Every rank's codes -> the largest of each over all ranks, the same on every rank (a host sync: call it
    every few steps, not every step). Used for the stop reason and for a save that falls due by the clock."""
    if not d.enabled:
        return codes
    t = torch.tensor(codes, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first launch, and without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


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
