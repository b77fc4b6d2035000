"""Run by torchrun in tests/test_distributed.py: the real training entry point, plus per-rank dumps.

Trains through `storyllama.train.train` exactly as bin/train does, with a DDP comm hook that records,
for every all-reduce DDP launches, which optimizer step it belonged to; then writes this rank's
final weights and that record under DUMP_DIR.

COMPILE_BACKEND (e.g. aot_eager) makes the trainer's torch.compile use that backend: dynamo's tracing, DDP's
graph splitting at bucket boundaries and the all-reduces are the same, without inductor's code generation
(which costs two 2-core processes about 40 s in the suite).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storyllama.train import parse_config, train  # noqa: E402

calls: list[int] = []  # one entry per bucket all-reduce: the bucket's index


def counting_hook(state, bucket):
    calls.append(bucket.index())
    return allreduce_hook(state, bucket)


def main() -> None:
    dump = Path(os.environ["DUMP_DIR"])
    if os.environ.get("COMPILE_BACKEND"):
        import functools

        torch.compile = functools.partial(torch.compile, backend=os.environ["COMPILE_BACKEND"])
    cfg, args = parse_config(sys.argv[1:])
    rank = int(os.environ["RANK"])
    summary = train(cfg, args, on_ddp=lambda m: m.register_comm_hook(None, counting_hook))
    torch.save(summary["model"].state_dict(), dump / f"rank{rank}.pt")
    (dump / f"rank{rank}.json").write_text(json.dumps({"calls": calls, "steps": summary["step"]}))
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
