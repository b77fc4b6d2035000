"""A stand-in tokenizer for the decode benchmarks: bin/export needs one, and its size sets the vocabulary."""

from __future__ import annotations

import json
from pathlib import Path


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
