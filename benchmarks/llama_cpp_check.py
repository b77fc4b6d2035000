"""Our GGUF export in llama.cpp, checked as a llama.cpp user would run it, for each precision.

    python benchmarks/llama_cpp_check.py --run RUN [--val FILE.jsonl] [--dtypes f32,f16,bf16,q8_0] [--threads N]
    make llama-cpp-check RUN=runs/demo          (installs the `llama` extra, llama-cpp-python, when missing)

For each precision the run's checkpoint is exported (`bin/export --format gguf --dtype D`, into a temporary
directory) and loaded with `llama_cpp.Llama(path, n_ctx=<trained context>, logits_all=True)`. Printed, one row per
precision:

- ids: token-id equality with our tokenizer on a fixed set of hard texts (quotes, digits, newlines, tabs and runs
  of spaces, accents, an emoji): how many of them give the same ids;
- max |dlogit|: the largest difference between llama.cpp's logits and ours (float32) at every position of a prompt;
- greedy: the same greedy continuation (up to 200 tokens or the trained context, stopping at end of text) as
  ours in float32; llama.cpp's f32 file must give it exactly;
- top-1: agreement of llama.cpp's argmax with ours (float32) at every position of the validation sample;
- bpb: bits per byte of the validation sample through llama.cpp, against ours in float32; the relative difference
  must be <= 0.5% for f32/f16/bf16 and <= 2% for q8_0;
- the file's size, and decode tokens/s of both engines: 200 greedy tokens at batch 1 after the same prompt, the
  same thread count (--threads), the median of --rounds interleaved rounds (ours in float32 for f32 and q8_0, in
  float16 / bfloat16 for f16 / bf16).

Every story of the validation file is scored alone: [EOT] + its tokens + [EOT], cut into windows of the trained
context (each window starts afresh, the same for both engines); both engines' softmax runs over the tokenizer's rows.
Exit status 1 when a bound fails (ids differ, f32 greedy differs, a bpb difference over its bound).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DTYPES = ("f32", "f16", "bf16", "q8_0")
BPB_BOUND = {"f32": 0.005, "f16": 0.005, "bf16": 0.005, "q8_0": 0.02}
OUR_SPEED_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": torch.float32}
HARD_TEXTS = [
    'She said, "Don\'t go!" and he replied: \'OK,\' then "why?"',
    "In 1999 there were 12,345 cats, 3.14 dogs and 007 birds; call 555-0100 at 10:30.",
    "Line one.\nLine two.\n\n\nLine five, after three newlines.\n",
    "a\tb\t\tc   three spaces,    four spaces, and a trailing run   ",
    "Café, naïve, façade, Zoë, Ångström and jalapeño.",
    "The dragon 🐉 smiled 😊 at the moon.",
]
PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog."
DEFAULT_VAL = Path("/work/shared/data/tinystories/valid-sample.jsonl")


def stories(path: Path, limit: int | None) -> list[str]:
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    rows = [r.strip() for r in rows if r and r.strip()]
    return rows[:limit] if limit else rows


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Windows of at most ctx tokens, each predicting its tokens 1..; consecutive windows share one token."""
    out, start = [], 0
    while start < len(ids) - 1:
        out.append(ids[start:start + ctx])
        start += ctx - 1
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score(logits: np.ndarray, window: list[int]) -> tuple[float, np.ndarray]:
    """(summed NLL in nats of window[1:], argmax at every predicting position) from logits (T, n_vocab)."""
    lp = log_softmax(logits[:-1])
    nll = -lp[np.arange(len(window) - 1), window[1:]].sum()
    return float(nll), logits[:-1].argmax(axis=-1)


class Ours:
    def __init__(self, run: str, threads: int):
        from storyllama.checkpoint import load_model, tokenizer_info
        from storyllama.data_prep.tokenizer import load_encoding

        torch.set_num_threads(threads)
        self.model, self.ckpt = load_model(run)  # float32, reference ops (CPU)
        self.enc = load_encoding(self.ckpt)
        tok = tokenizer_info(self.ckpt)
        self.n_vocab, self.eot = tok["vocab_size"], tok["eot_id"]
        self.ctx = self.model.cfg.block_size
        self.run = run

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(torch.tensor([ids]))[0, :, :self.n_vocab].float().numpy()

    def sampler(self, dtype: torch.dtype):
        """The model as bin/sample runs it on the CPU (load_for_sampling: weights in dtype, packed for decoding)."""
        from storyllama.sample import load_for_sampling

        if getattr(self, "_sampler_dtype", None) != dtype:
            self._sampler = load_for_sampling(self.run, torch.device("cpu"), dtype)[0]
            self._sampler_dtype = dtype
        return self._sampler

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """bin/sample's greedy continuation in float32, stopping at end of text."""
        from storyllama.config import SampleConfig
        from storyllama.sample import generate

        return generate(self.sampler(torch.float32), [prompt], SampleConfig(max_new_tokens=n, temperature=0.0),
                        self.eot, self.n_vocab)[0]

    def speed(self, prompt: list[int], n: int, dtype: torch.dtype) -> float:
        """Decode tokens/s of n greedy tokens (no stop at end of text) with the weights in dtype."""
        from storyllama.config import SampleConfig
        from storyllama.sample import generate

        stats: dict = {}
        generate(self.sampler(dtype), [prompt], SampleConfig(max_new_tokens=n, temperature=0.0), None, self.n_vocab,
                 stats=stats)
        return (stats["new_tokens"] - 1) / stats["decode_s"]


class LlamaCpp:
    def __init__(self, path: Path, ctx: int, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, logits_all=True, verbose=False,
                                   n_threads=threads, n_threads_batch=threads)
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def _generate(self, prompt: list[int], n: int, stop: int | None) -> tuple[list[int], float]:
        out, t_first = [], None
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                     reset=True):
            if stop is not None and tok == stop:
                break
            out.append(tok)
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) == n:
                break
        elapsed = time.perf_counter() - t_first if t_first is not None else float("nan")
        return out, elapsed

    def greedy(self, prompt: list[int], n: int, eot: int) -> list[int]:
        return self._generate(prompt, n, eot)[0]

    def speed(self, prompt: list[int], n: int) -> float:
        out, elapsed = self._generate(prompt, n, None)
        return (len(out) - 1) / elapsed


def check(run: str, val: Path, dtypes: list[str], threads: int, new_tokens: int, rounds: int,
          max_stories: int | None, work: Path) -> dict:
    from storyllama.export import export

    ours = Ours(run, threads)
    ctx, enc, eot = ours.ctx, ours.enc, ours.eot
    prompt = enc.encode_ordinary(PROMPT)[: max(1, ctx // 4)]
    n_greedy = min(200, ctx - len(prompt))
    n_speed = min(new_tokens, ctx - len(prompt))
    texts = stories(val, max_stories)
    seqs = [[eot] + enc.encode_ordinary(t) + [eot] for t in texts]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    # ours, float32: the reference for every precision
    t0 = time.perf_counter()
    ours_nll, ours_top1 = 0.0, []
    for seq in seqs:
        for w in windows(seq, ctx):
            nll, top1 = score(ours.logits(w), w)
            ours_nll += nll
            ours_top1.append(top1)
    ours_bpb = ours_nll / math.log(2) / n_bytes
    ours_logits = ours.logits(prompt)
    ours_greedy = ours.greedy(prompt, n_greedy)
    from storyllama.checkpoint import describe

    res = {"run": describe(ours.ckpt), "context": ctx, "n_vocab": ours.n_vocab, "threads": threads,
           "val_stories": len(texts), "val_bytes": n_bytes, "val_positions": int(sum(len(t) for t in ours_top1)),
           "ours_f32_bpb": ours_bpb, "ours_eval_s": round(time.perf_counter() - t0, 1), "new_tokens": n_speed,
           "greedy_tokens": len(ours_greedy), "rows": []}
    ours_ids = [enc.encode_ordinary(t) for t in HARD_TEXTS]

    for dt in dtypes:
        path = export(ours.ckpt, work / f"model-{dt}.gguf", format="gguf", dtype=dt)
        cpp = LlamaCpp(path, ctx, threads)
        assert cpp.n_vocab == ours.n_vocab, (cpp.n_vocab, ours.n_vocab)
        ids_equal = sum(cpp.tokenize(t) == want for t, want in zip(HARD_TEXTS, ours_ids))
        dlogit = float(np.abs(cpp.logits(prompt) - ours_logits).max())
        greedy_equal = cpp.greedy(prompt, n_greedy, eot) == ours_greedy
        t0 = time.perf_counter()
        nll, agree, k = 0.0, 0, 0
        for seq in seqs:
            for w in windows(seq, ctx):
                n, top1 = score(cpp.logits(w), w)
                nll += n
                agree += int((top1 == ours_top1[k]).sum())
                k += 1
        bpb = nll / math.log(2) / n_bytes
        eval_s = time.perf_counter() - t0
        speeds_cpp, speeds_ours = [], []
        for _ in range(rounds):  # interleaved: one round of each engine, then again
            speeds_cpp.append(cpp.speed(prompt, n_speed))
            speeds_ours.append(ours.speed(prompt, n_speed, OUR_SPEED_DTYPE[dt]))
        rel = (bpb - ours_bpb) / ours_bpb
        row = {"dtype": dt, "file_mb": path.stat().st_size / 2**20, "ids_equal": ids_equal,
               "ids_total": len(HARD_TEXTS), "max_dlogit": dlogit, "greedy_equal": greedy_equal,
               "top1": agree / res["val_positions"], "bpb": bpb, "bpb_rel": rel, "bpb_bound": BPB_BOUND[dt],
               "cpp_eval_s": round(eval_s, 1), "cpp_tok_s": statistics.median(speeds_cpp),
               "ours_tok_s": statistics.median(speeds_ours), "ours_dtype": str(OUR_SPEED_DTYPE[dt]).split(".")[-1]}
        row["ok"] = bool(ids_equal == len(HARD_TEXTS) and abs(rel) <= BPB_BOUND[dt] and (dt != "f32" or greedy_equal))
        res["rows"].append(row)
        del cpp
        print(f"  {dt}: done ({eval_s:.0f} s in llama.cpp)", file=sys.stderr, flush=True)
    res["ok"] = all(r["ok"] for r in res["rows"])
    return res


def table(res: dict) -> str:
    lines = [f"run {res['run']}: context {res['context']}, vocabulary {res['n_vocab']:,}; validation: "
             f"{res['val_stories']} stories, {res['val_positions']:,} positions, {res['val_bytes']:,} bytes; "
             f"ours (float32) {res['ours_f32_bpb']:.4f} bpb; {res['threads']} thread(s); speed: "
             f"{res['new_tokens']} greedy tokens at batch 1 (median)",
             "",
             "| dtype | file MB | ids equal | max abs dlogit | greedy equal (f32) | top-1 agree | bpb llama.cpp | "
             "vs ours f32 | bound | llama.cpp tok/s | ours tok/s | ok |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['dtype']} | {r['file_mb']:.2f} | {r['ids_equal']}/{r['ids_total']} | "
                     f"{r['max_dlogit']:.2e} | {'yes' if r['greedy_equal'] else 'no'} | {100 * r['top1']:.2f}% | "
                     f"{r['bpb']:.4f} | {100 * r['bpb_rel']:+.4f}% | {100 * r['bpb_bound']:.1f}% | "
                     f"{r['cpp_tok_s']:.0f} | {r['ours_tok_s']:.0f} ({r['ours_dtype']}) | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run (or checkpoint) directory to export and check")
    p.add_argument("--val", type=Path, default=DEFAULT_VAL, help=f"validation stories, JSONL with a 'text' field "
                   f"(default: {DEFAULT_VAL})")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="precisions to check (default: all four)")
    p.add_argument("--threads", type=int, default=1, help="threads for both engines (default: 1)")
    p.add_argument("--new_tokens", type=int, default=200, help="greedy tokens timed per round (default: 200)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: 3)")
    p.add_argument("--max_stories", type=int, default=None, help="score only the first N stories (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file (default: none)")
    ns = p.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: pip install -e '.[llama]' (it builds from source for several "
              "minutes), or make llama-cpp-check", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in ns.dtypes.split(",") if d.strip()]
    if unknown := [d for d in dtypes if d not in DTYPES]:
        p.error(f"--dtypes: {', '.join(unknown)} not one of {', '.join(DTYPES)}")
    with tempfile.TemporaryDirectory(prefix="llama-cpp-check-") as work:
        res = check(ns.run, ns.val, dtypes, ns.threads, ns.new_tokens, ns.rounds, ns.max_stories, Path(work))
    print(table(res))
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
