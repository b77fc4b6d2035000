"""Measure training throughput and peak RSS of one configuration in a fresh process.

    python benchmarks/train_step.py --preset storyllama-88m --batch 4 --block 512 [--compile] [--fused_ce]
                                    [--doc_aligned] [--optimizer adamw|muon]

--doc_aligned: the windows hold stories of 50 to 400 tokens, each ending with an EOT, and the step runs with
document masking (the model's (B, 1, T, T) story mask instead of SDPA's is_causal).
--optimizer: the trainer's own optimizer (storyllama.optim.build_optimizer: fused AdamW, or Muon + AdamW).

Prints one JSON line: tokens/s over the timed steps (after warm-up steps, which include compilation),
achieved GFLOP/s (6 N + attention FLOPs per token), and the process's peak RSS in MB. A fresh
process per variant keeps one variant's allocations out of another's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from storyllama.config import TrainConfig, preset
from storyllama.model import Llama
from storyllama.optim import MuonAdamW, build_optimizer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fused_ce", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--doc_aligned", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0, help="residual dropout")
    p.add_argument("--attn_dropout", type=float, default=0.0, help="dropout on the attention probabilities")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    over = {"block_size": a.block, "dropout": a.dropout, "attn_dropout": a.attn_dropout}
    if a.vocab:
        over["vocab_size"] = a.vocab
    cfg = preset(a.preset, **over)
    torch.manual_seed(0)
    model = Llama(cfg, fused_ce=a.fused_ce)
    opt = build_optimizer(model, TrainConfig(optimizer=a.optimizer, max_lr=1e-4), torch.device("cpu"))
    ok = torch.tensor(True)  # MuonAdamW.step(ok): the trainer's on-device skip decision
    step_model = torch.compile(model) if a.compile else model
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.block))
    y = torch.randint(0, cfg.vocab_size, (a.batch, a.block))
    kw = {}
    if a.doc_aligned:
        eot = cfg.vocab_size - 1
        for row in x:  # stories of 50..400 tokens (TinyStories: ~200 with GPT-2's tokenizer)
            ends = torch.randint(50, 400, (a.block // 50,)).cumsum(0)
            row[ends[ends < a.block]] = eot
        kw = {"doc_eot": eot}

    def step() -> float:
        loss = step_model(x, y, **kw)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(ok) if isinstance(opt, MuonAdamW) else opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    dt = time.perf_counter() - t0
    tps = a.batch * a.block * a.steps / dt
    print(json.dumps({"tok_per_s": tps, "gflops": cfg.flops_per_token() * tps / 1e9,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params_m": cfg.num_params() / 1e6}))


if __name__ == "__main__":
    main()
