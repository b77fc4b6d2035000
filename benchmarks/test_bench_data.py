"""Data-prep throughput in MB of story text per second, end to end (read, tokenize, write shards).

Input: the shared TinyStories train sample (.jsonl) repeated to >= 20 MB, plus the shared valid sample,
written to a temporary directory. Variants, side by side in one run:

- baseline: llama2.c's approach: a sentencepiece BPE of 4,096 trained on the sample (not timed),
  then a 2-process pool, each process tokenizing its half of the data one story at a time into a
  Python list and writing a uint16 file;
- ours: `prepare()` (what bin/prepare_data runs) with gpt2 (the shared ranks file) and bpe:4096,
  on 1 and 2 workers. bpe:4096 is measured twice: end to end including training the BPE on all of
  the (repeated) training text, and reusing a trained ranks file, which isolates tokenize + write.

Each records `MB_per_s` and `x_sentencepiece_pool` (its speed over the baseline's) in extra_info.
Skipped, with the reason, when the shared samples are absent.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from storyllama.data_prep.prepare import PrepareOptions, prepare
from storyllama.data_prep.tokenizer import dump_ranks, train_bpe

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
TRAIN = SHARED / "tinystories" / "train-sample.jsonl"
VALID = SHARED / "tinystories" / "valid-sample.jsonl"
GPT2 = SHARED / "gpt2.tiktoken"
TARGET_BYTES = 20_000_000
ROUNDS = 2

pytestmark = pytest.mark.skipif(not (TRAIN.is_file() and VALID.is_file()),
                                reason=f"shared TinyStories samples under {SHARED / 'tinystories'} are absent")
_mb_per_s: dict[str, float] = {}


def _stories(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.open(encoding="utf-8") if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bench_data")
    lines = TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)
    reps = -(-TARGET_BYTES // TRAIN.stat().st_size)  # ceil
    big = d / "train-big.jsonl"
    big.write_text("".join(lines * reps), encoding="utf-8")
    # The baseline's own layout: the same stories in two shard files, one per process.
    all_lines = lines * reps
    half = len(all_lines) // 2
    halves = [d / "half0.jsonl", d / "half1.jsonl"]
    halves[0].write_text("".join(all_lines[:half]), encoding="utf-8")
    halves[1].write_text("".join(all_lines[half:]), encoding="utf-8")
    text_mb = sum(len(s.strip().encode()) for s in _stories(big) + _stories(VALID)) / 1e6
    return {"dir": d, "big": big, "halves": halves, "text_mb": text_mb,
            "baseline_mb": sum(len(s.strip().encode()) for s in _stories(big)) / 1e6}


# ---------------------------------------------------------------------------------------------
# Baseline: sentencepiece, one story at a time, a 2-process pool (llama2.c's pretokenize)


def _sp_encode_file(job: tuple[str, str, str]) -> int:
    import sentencepiece as spm

    model, src, dst = job
    sp = spm.SentencePieceProcessor(model_file=model)
    tokens: list[int] = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            tokens.extend([sp.bos_id(), *sp.encode(text)])
    np.array(tokens, dtype=np.uint16).tofile(dst)
    return len(tokens)


@pytest.fixture(scope="module")
def sp_model(corpus) -> str:
    import sentencepiece as spm

    text = corpus["dir"] / "sp_train.txt"
    text.write_text("".join(s.strip() + "\n" for s in _stories(TRAIN)), encoding="utf-8")
    prefix = corpus["dir"] / "sp4096"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), model_type="bpe", vocab_size=4096,
                                   self_test_sample_size=0, input_format="text", character_coverage=1.0,
                                   num_threads=2, split_digits=True, allow_whitespace_only_pieces=True,
                                   byte_fallback=True, normalization_rule_name="identity", minloglevel=2)
    return str(prefix) + ".model"


def test_sentencepiece_pool_baseline(benchmark, corpus, sp_model):
    jobs = [(sp_model, str(h), str(corpus["dir"] / f"sp_{i}.bin")) for i, h in enumerate(corpus["halves"])]

    def run() -> float:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork")) as pool:
            total = sum(pool.map(_sp_encode_file, jobs))
        assert total > 0
        return corpus["baseline_mb"] / (time.perf_counter() - t0)

    speeds = [benchmark.pedantic(run, rounds=ROUNDS, iterations=1)]
    mb_s = corpus["baseline_mb"] / benchmark.stats.stats.mean
    _mb_per_s["baseline"] = mb_s
    benchmark.extra_info.update({"MB_per_s": mb_s, "MB": corpus["baseline_mb"], "last_round_MB_per_s": speeds[0],
                                 "load_avg_1m": os.getloadavg()[0]})  # the machine is shared: say how busy it was


# ---------------------------------------------------------------------------------------------
# Ours


@pytest.fixture(scope="module")
def bpe_ranks_file(corpus) -> Path:
    path = corpus["dir"] / "bpe4096.tiktoken"
    dump_ranks(train_bpe(_stories(corpus["big"]), 4096), path)
    return path


VARIANTS = [("gpt2", 1), ("gpt2", 2), ("bpe:4096", 1), ("bpe:4096", 2), ("bpe:4096-reused", 1),
            ("bpe:4096-reused", 2)]


@pytest.mark.parametrize("tokenizer,num_proc", VARIANTS, ids=[f"{t}-{n}w" for t, n in VARIANTS])
def test_prepare_throughput(benchmark, corpus, bpe_ranks_file, tokenizer, num_proc):
    if tokenizer == "gpt2" and not GPT2.is_file():
        pytest.skip(f"GPT-2 ranks file {GPT2} is absent")
    tokenizer_file = {"gpt2": GPT2, "bpe:4096": None, "bpe:4096-reused": bpe_ranks_file}[tokenizer]
    rounds = iter(range(100))

    def setup():
        out = corpus["dir"] / f"out-{tokenizer}-{num_proc}-{next(rounds)}"
        opts = PrepareOptions(out=out, train=[str(corpus["big"])], val=[str(VALID)],
                              tokenizer=tokenizer.replace("-reused", ""), tokenizer_file=tokenizer_file,
                              num_proc=num_proc, progress=False)
        return (opts,), {}

    metas = []
    benchmark.pedantic(lambda opts: metas.append(prepare(opts)), setup=setup, rounds=ROUNDS, iterations=1)
    meta = metas[-1]
    text_mb = (meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]) / 1e6
    assert abs(text_mb - corpus["text_mb"]) < 1e-6
    mb_s = text_mb / benchmark.stats.stats.mean
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    benchmark.extra_info.update({"MB_per_s": mb_s, "MB": text_mb, "tokens_per_s": tokens / benchmark.stats.stats.mean,
                                 "workers": num_proc, "load_avg_1m": os.getloadavg()[0]})
    if "baseline" in _mb_per_s:
        benchmark.extra_info["x_sentencepiece_pool"] = mb_s / _mb_per_s["baseline"]
    for out in corpus["dir"].glob(f"out-{tokenizer}-{num_proc}-*"):
        shutil.rmtree(out)
