"""Our CPU decode against llama.cpp on the same model (issue 31, item 5): tokens/s at batch 1, the same
16-token prompt, 200 greedy tokens, matched precision (our float32 against the f32 GGUF, our bfloat16 against
the bf16 GGUF), two shapes:

- `tiny` (dim 128, 4 layers, vocab 2,048: about 1M parameters): the per-token overhead dominates;
- `88m` (the seed's shape, 50M parameters, GPT-2's 50,257 tokens): reading the weights dominates.

Variants, run interleaved (round 1: all; round 2: all; ...) so a burst of other work on the machine slows all of
them; figures are the best round. `ours` = generate() as bin/sample runs it (weights packed for decoding, the
lean FastDecoder step); `ours-model` = the same with the model's own forward per step (FastDecoder off: the
decode before issue 31); `llama.cpp` = llama-cpp-python's generate (top-k 1) on our GGUF export, same thread count.
`ours-compiled` = the compiled step (bin/sample --compile; the tiny shape only, compilation excluded).
`ours_vs_llama.cpp` is the target (>= 1.0). Needs llama-cpp-python (pip install -e '.[llama]'); skips without.
Threads: STORYLLAMA_BENCH_THREADS (default 1, as the other decode benchmarks: see test_bench_sample.py).

    python -m pytest benchmarks/test_bench_llama_cpp.py --benchmark-only -s
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from bench_common import THREADS, fixed_threads, write_tokenizer  # noqa: F401 (fixed_threads: autouse)

from storyllama import cpu_decode
from storyllama.config import SampleConfig, preset
from storyllama.cpu_decode import prepare_for_decoding
from storyllama.model import Llama
from storyllama.sample import generate

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

PROMPT_LEN, NEW_TOKENS = 16, 200
SHAPES = {"tiny": (lambda: preset("tiny", vocab_size=2048, dropout=0.0), 2048),
          "88m": (lambda: preset("storyllama-88m", dropout=0.0), 50257)}
GGUF_DTYPE = {"float32": "f32", "bfloat16": "bf16"}
_made: dict = {}
_results: dict[str, dict] = {}


def engines(shape: str, dtype: str, tmp_root: Path):
    """(our model as bin/sample loads it, llama.cpp on its GGUF export in the matched precision)."""
    key = (shape, dtype)
    if key not in _made:
        from storyllama import checkpoint
        from storyllama.export import export

        make_cfg, vocab = SHAPES[shape]
        torch.manual_seed(0)
        model = Llama(make_cfg()).eval()
        with torch.no_grad():  # weights that are not all alike, so greedy decoding does not settle on one token
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.1)
        root = tmp_root / f"{shape}-{dtype}"
        write_tokenizer(root / "data", vocab)
        ckpt = checkpoint.save(root / "run", 1, model, None, {}, data_dir=root / "data")
        gguf = export(ckpt, root / "model.gguf", "gguf", dtype=GGUF_DTYPE[dtype])
        if dtype == "bfloat16":
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)  # weights only; the RoPE tables stay fp32, as bin/sample does
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=model.cfg.block_size, verbose=False, n_threads=THREADS,
                              n_threads_batch=THREADS)
        shutil.rmtree(root / "run", ignore_errors=True)
        _made[key] = (prepare_for_decoding(model), llm, vocab)
    return _made[key]


def prompt(vocab: int) -> list[int]:
    return torch.randint(0, vocab - 1, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()


def run_once(impl: str, shape: str, dtype: str, tmp_root: Path) -> float:
    """Decode tokens/s of one generation: NEW_TOKENS - 1 steps after the first token (prefill excluded)."""
    model, llm, vocab = engines(shape, dtype, tmp_root)
    ids = prompt(vocab)
    if impl == "llama.cpp":
        n, t_first = 0, None
        for _ in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            if n == NEW_TOKENS:
                break
        return (n - 1) / (time.perf_counter() - t_first)
    cpu_decode.USE_FAST_DECODER = impl == "ours"
    try:
        stats: dict = {}
        generate(model, [ids], SampleConfig(max_new_tokens=NEW_TOKENS, temperature=0.0,
                                            compile=impl == "ours-compiled"), None, vocab, stats=stats)
    finally:
        cpu_decode.USE_FAST_DECODER = True
    return (stats["new_tokens"] - 1) / stats["decode_s"]


IMPLS = ("ours", "ours-model", "llama.cpp")
# where the per-token overhead dominates, the compiled step (bin/sample --compile) is timed too
COMPILED_SHAPES = ("tiny",)
GROUPS = {f"{shape}-{dtype}": (shape, dtype) for shape in SHAPES for dtype in GGUF_DTYPE}


@pytest.mark.parametrize("group", list(GROUPS))
def test_decode_against_llama_cpp(benchmark, tmp_path_factory, group):
    shape, dtype = GROUPS[group]
    if dtype == "bfloat16" and not cpu_decode.packing_supported(torch.bfloat16):
        pytest.skip("this CPU has no bf16 matmul path in oneDNN")
    tmp_root = tmp_path_factory.getbasetemp() / "bench_llama_cpp"
    impls = IMPLS + (("ours-compiled",) if shape in COMPILED_SHAPES else ())
    for impl in impls:  # warm up: export, load, first touch of the weights, the compilation
        run_once(impl, shape, dtype, tmp_root)
    runs: dict[str, list[float]] = {impl: [] for impl in impls}
    rounds = 5 if shape == "tiny" else 3

    def interleaved() -> None:
        for _ in range(rounds):
            for impl in impls:
                runs[impl].append(run_once(impl, shape, dtype, tmp_root))

    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    info = {"threads": THREADS, "new_tokens": NEW_TOKENS, "loadavg": os.getloadavg()[0],
            "params": engines(shape, dtype, tmp_root)[0].cfg.num_params()}
    for impl in impls:
        info[f"{impl}_tok_per_s"] = max(runs[impl])
    if "ours-compiled" in runs:
        info["ours-compiled_vs_llama.cpp"] = info["ours-compiled_tok_per_s"] / info["llama.cpp_tok_per_s"]
    info["ours_vs_llama.cpp"] = info["ours_tok_per_s"] / info["llama.cpp_tok_per_s"]
    info["ours_vs_ours-model"] = info["ours_tok_per_s"] / info["ours-model_tok_per_s"]
    _results[group] = info
    benchmark.extra_info.update(info)


def test_summary(benchmark):
    """One line per group: tokens/s of each engine and the ratio against the target of 1.0."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    lines = []
    for group, info in _results.items():
        r = info["ours_vs_llama.cpp"]
        verdict = "reached" if r >= 1.0 else f"short by {100 * (1 - r):.0f}%"
        compiled = (f"; compiled step {info['ours-compiled_tok_per_s']:,.0f} = "
                    f"{info['ours-compiled_vs_llama.cpp']:.2f}x" if "ours-compiled_tok_per_s" in info else "")
        lines.append(f"{group}: ours {info['ours_tok_per_s']:,.0f} tok/s (model forward "
                     f"{info['ours-model_tok_per_s']:,.0f}), llama.cpp {info['llama.cpp_tok_per_s']:,.0f}: "
                     f"{r:.2f}x (target 1.0, {verdict}){compiled}")
        benchmark.extra_info[f"{group}_ours_vs_llama.cpp"] = r
    print("\n" + "\n".join(lines))
