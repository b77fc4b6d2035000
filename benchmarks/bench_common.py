"""What the decode benchmarks share: the thread count they run at (STORYLLAMA_BENCH_THREADS, default 1; see
test_bench_sample.py for why one thread), a module fixture that holds torch to it, and a stand-in tokenizer
(bin/export needs one, and its size sets the vocabulary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

THREADS = int(os.environ.get("STORYLLAMA_BENCH_THREADS", "1"))


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    """torch at THREADS threads for the importing module's tests (imported there, it applies to that module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def write_tokenizer(data_dir: Path, n_vocab: int) -> None:
    """A tiktoken ranks file of n_vocab - 1 ranks (256 bytes + two-byte tokens) and its meta.json, as a prepared data
    directory holds them (export suppresses the padded ids above n_vocab)."""
    from storyllama.data_prep.tokenizer import GPT2_PAT_STR, TOKENIZER_FILE, dump_ranks, file_sha256

    ranks = {bytes([b]): b for b in range(256)}
    for i in range(n_vocab - 1 - 256):
        ranks[bytes([i // 256, i % 256])] = 256 + i
    data_dir.mkdir(parents=True, exist_ok=True)
    dump_ranks(ranks, data_dir / TOKENIZER_FILE)
    meta = {"tokenizer": {"name": "bench", "vocab_size": n_vocab, "eot_id": n_vocab - 1, "file": TOKENIZER_FILE,
                          "sha256": file_sha256(data_dir / TOKENIZER_FILE), "pat_str": GPT2_PAT_STR}}
    (data_dir / "meta.json").write_text(json.dumps(meta))
