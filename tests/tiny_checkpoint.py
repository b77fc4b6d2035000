"""A tiny random model saved as a real checkpoint with a real (byte-level) tokenizer, for the sampler and
export tests: 256 single-byte ranks + <|endoftext|> = 256, vocabulary 257, padded to 320 in the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from storyllama import checkpoint
from storyllama.config import ModelConfig
from storyllama.data_prep.tokenizer import EOT, GPT2_PAT_STR, TOKENIZER_FILE, dump_ranks, file_sha256
from storyllama.model import Llama

N_VOCAB, EOT_ID = 257, 256
TINY = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, block_size=64, hidden_dim=96)


def tiny_model(seed: int = 0, **overrides) -> Llama:
    """Untied by default: a tied random model tends to predict its input token over and over."""
    torch.manual_seed(seed)
    return Llama(ModelConfig(**{**TINY, "tie_embeddings": False, **overrides})).eval()


def write_tokenizer(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    dump_ranks({bytes([b]): b for b in range(256)}, data_dir / TOKENIZER_FILE)
    meta = {"tokenizer": {"name": "bytes", "vocab_size": N_VOCAB, "eot_id": EOT_ID, "file": TOKENIZER_FILE,
                          "sha256": file_sha256(data_dir / TOKENIZER_FILE), "pat_str": GPT2_PAT_STR,
                          "special": EOT}}
    (data_dir / "meta.json").write_text(json.dumps(meta))


def save_checkpoint(tmp_path: Path, model: Llama, step: int = 10) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) holding `model` and the byte tokenizer."""
    data = tmp_path / "data"
    write_tokenizer(data)
    run = tmp_path / "run"
    ckpt = checkpoint.save(run, step, model, None, {"step": step}, data_dir=data)
    return run, ckpt
