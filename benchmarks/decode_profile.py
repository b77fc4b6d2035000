"""Where one decode step's time goes on the CPU, per token at batch 1 (issue 31, item 5).

    python benchmarks/decode_profile.py --shape tiny --shape 88m [--threads 1] [--dtype float32]

For each shape it times, as medians over --steps steps after a warm-up, with the cache half full:
- `step`: the whole eager decode step as bin/sample runs it (model forward + greedy pick + done mask);
- `forward`: decode_one_token alone (the model), and `sample`: the greedy pick alone;
- `matmuls`: only the step's matrix products (every Linear's weight and the head, one row each), on the
  same packed weights: the time that is kernels, not dispatch;
- `ops`: the number of ATen ops one eager step dispatches (torch profiler), and `dispatch` = forward - matmuls;
- `fast`: the lean step (cpu_decode.FastDecoder) that eager decoding on the CPU runs now, and its `fast_ops`;
- `compiled`: the same step through torch.compile (inductor, C++ wrapper), as `bin/sample --compile` runs it.
Prints one table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from storyllama.config import SampleConfig, preset  # noqa: E402
from storyllama.cpu_decode import fast_decoder, lm_head_logits, prepare_for_decoding  # noqa: E402
from storyllama.model import Llama  # noqa: E402
from storyllama.sample import SamplingParams, _compiled_decode_step, _decode_step, decode_one_token  # noqa: E402

SHAPES = {"tiny": lambda: preset("tiny", vocab_size=2048), "small": lambda: preset("small"),
          "88m": lambda: preset("storyllama-88m", dropout=0.0)}


def median_us(fn, steps: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def profile(shape: str, dtype: torch.dtype, steps: int, compiled: bool) -> dict:
    torch.manual_seed(0)
    cfg = SHAPES[shape]()
    model = Llama(cfg).to(dtype).eval()  # built outside inference mode, as bin/sample loads it
    prepare_for_decoding(model)
    with torch.inference_mode():
        return _profile(model, cfg, shape, dtype, steps, compiled)


def _profile(model, cfg, shape: str, dtype: torch.dtype, steps: int, compiled: bool) -> dict:
    vocab = cfg.vocab_size if shape != "88m" else 50257
    S = 256
    model.setup_caches(1, S, dtype=torch.float32)
    tok = torch.tensor([[1]])
    pos = torch.tensor([S // 2])
    pad = torch.zeros(1, 1, dtype=torch.long)
    done = torch.zeros(1, dtype=torch.bool)
    params = SamplingParams.of(SampleConfig(temperature=0.0))
    row = {"shape": shape, "params": cfg.num_params(), "dtype": str(dtype).replace("torch.", "")}

    row["step_us"] = median_us(lambda: _decode_step(model, tok, pos, pad, None, None, done, params, 0, vocab), steps)
    row["forward_us"] = median_us(lambda: decode_one_token(model, tok, pos, pad, vocab), steps)
    dec = fast_decoder(model)
    row["fast_us"] = median_us(lambda: dec.step(tok, S // 2, None, vocab), steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dec.step(tok, S // 2, None, vocab)
    row["fast_ops"] = sum(1 for e in prof.events() if e.cpu_parent is None)
    logits = decode_one_token(model, tok, pos, pad, vocab)
    row["sample_us"] = median_us(lambda: logits.argmax(dim=-1), steps)

    # the matmuls alone: every Linear of the blocks (through its PackedLinear when packed) and the head
    x = torch.randn(1, 1, cfg.dim, dtype=dtype)
    h = torch.randn(1, 1, cfg.hidden_dim, dtype=dtype)
    linears = [(m, h if name.endswith("w2") else x) for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]

    def matmuls():
        for m, inp in linears:
            m(inp)
        lm_head_logits(model, x[:, 0], vocab)

    row["matmuls_us"] = median_us(matmuls, steps)
    row["dispatch_us"] = row["forward_us"] - row["matmuls_us"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _decode_step(model, tok, pos, pad, None, None, done, params, 0, vocab)
    row["ops"] = sum(1 for e in prof.events() if e.cpu_parent is None)  # ops called from Python, one step
    row["weight_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if compiled:
        step = _compiled_decode_step(torch.device("cpu"))
        t0 = time.perf_counter()
        step(model, tok, pos, pad, None, None, done, params, 0, vocab)
        row["compile_s"] = time.perf_counter() - t0
        row["compiled_us"] = median_us(lambda: step(model, tok, pos, pad, None, None, done, params, 0, vocab), steps)
    model.clear_caches()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape (repeatable; default tiny)")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16"), help="weights (default float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per measurement (default 200)")
    p.add_argument("--no_compile", action="store_true", help="skip the compiled step")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [profile(s, getattr(torch, d), a.steps, not a.no_compile)
            for s in (a.shape or ["tiny"]) for d in (a.dtype or ["float32"])]
    cols = ["shape", "dtype", "params", "weight_mb", "ops", "step_us", "forward_us", "matmuls_us", "dispatch_us",
            "sample_us", "fast_ops", "fast_us", "compiled_us", "compile_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:,.1f}" if isinstance(r.get(c), float) else f"{r.get(c, '-'):,}"
                                if isinstance(r.get(c), int) else str(r.get(c, "-")) for c in cols) + " |")
    print(f"threads {a.threads}, loadavg {os.getloadavg()[0]:.2f}; tokens/s = 1e6 / step_us (eager) or "
          "1e6 / compiled_us")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
