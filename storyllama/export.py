"""Export a checkpoint to a Hugging Face `LlamaForCausalLM` directory:

    HF_DIR/config.json          LlamaConfig (written here from storyllama.hf.hf_config_dict)
    HF_DIR/model.safetensors    weights under transformers' names (RoPE is already in its half-split layout)
    HF_DIR/generation_config.json   EOT as eos, and the padded vocabulary ids suppressed
    HF_DIR/tokenizer.tiktoken   the tokenizer's tiktoken ranks file, and meta.json describing it
    HF_DIR/README.md            how to load both

transformers is not needed to export, only to load. The directory is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from storyllama.checkpoint import TOKENIZER_FILES, WEIGHTS, CheckpointError, load_model_config, resolve
from storyllama.config import ModelConfig, OneLineErrorParser
from storyllama.hf import hf_config_dict, to_hf_state_dict

_README = """\
# {name}

A StoryLlama model ({params:,} parameters: dim {dim}, {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads,
context {block_size}) exported from `{ckpt}` for Hugging Face transformers.

The tokenizer is not a Hugging Face tokenizer: it is a tiktoken ranks file, `tokenizer.tiktoken` (one
`base64(token) rank` line per token), with `<|endoftext|>` = {eot} as its only special token; `meta.json`
holds its name, split pattern and sha256. The model's vocabulary is padded to {vocab_size}; ids from
{n_vocab} up never occur in text (`generation_config.json` suppresses them in `generate`).

```python
import base64, json
import tiktoken
import torch
from transformers import LlamaForCausalLM

path = "{out}"
model = LlamaForCausalLM.from_pretrained(path)
tok = json.load(open(f"{{path}}/meta.json"))["tokenizer"]
ranks = {{}}
for line in open(f"{{path}}/tokenizer.tiktoken", "rb"):
    if line.strip():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
enc = tiktoken.Encoding(tok["name"], pat_str=tok["pat_str"], mergeable_ranks=ranks,
                        special_tokens={{"<|endoftext|>": len(ranks)}})

prompt = torch.tensor([enc.encode("Once upon a time")])
ids = model.generate(prompt, max_new_tokens=200, do_sample=True, temperature=0.8)
print(enc.decode(ids[0].tolist()))
```

Within the StoryLlama repository, `data_prep.tokenizer.load_encoding(path)` builds the same encoding.
"""


def hf_config_json(cfg: ModelConfig, eot_id: int | None) -> dict:
    """config.json for transformers 4.x and 5.x alike (both rope_theta and rope_parameters)."""
    conf = hf_config_dict(cfg)
    conf["dtype"] = conf["torch_dtype"]
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    conf.update(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None, use_cache=True,
                initializer_range=0.02, attention_dropout=0.0, pretraining_tp=1)
    return conf


def _eot_id(ckpt: Path) -> tuple[int | None, int | None]:
    """(EOT id, tokenizer vocabulary) from the checkpoint's meta.json, or (None, None) without one."""
    try:
        tok = json.loads((ckpt / "meta.json").read_text())["tokenizer"]
        return int(tok["eot_id"]), int(tok["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def export(path: str | Path, out: str | Path) -> Path:
    """Write the HF directory for checkpoint `path` (or a run's latest) to `out`; returns `out`.

    Raises CheckpointError for a missing or partial checkpoint, ValueError when `out` exists and is not
    an earlier export.
    """
    ckpt = resolve(path)
    cfg = load_model_config(ckpt)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ValueError(f"--out {out} exists and is not an exported model directory; choose a new path")
    missing = [f for f in TOKENIZER_FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} has no {' or '.join(missing)}: the exported model would have no "
                              "tokenizer; copy them from the data directory the run was trained on")
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except Exception as e:  # safetensors' own error types for cut or corrupt files
        raise CheckpointError(f"cannot read {ckpt / WEIGHTS}: {e}; use an earlier checkpoint") from e
    hf_state = to_hf_state_dict(state, cfg)
    if cfg.tie_embeddings:
        # safetensors refuses two names for one tensor; transformers ties lm_head to the embedding on load.
        del hf_state["lm_head.weight"]
    eot_id, n_vocab = _eot_id(ckpt)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_json(cfg, eot_id), indent=2) + "\n")
        gen = {"bos_token_id": eot_id, "eos_token_id": eot_id}
        if n_vocab is not None and n_vocab < cfg.vocab_size:
            # The model's rows past the tokenizer's vocabulary (padding to a multiple of 64) are untrained:
            # `generate` must never pick them (our sampler computes only the tokenizer's rows).
            gen["suppress_tokens"] = list(range(n_vocab, cfg.vocab_size))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            shutil.copy2(ckpt / f, tmp / f)
        (tmp / "README.md").write_text(_README.format(
            name=out.name, params=cfg.num_params(), dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, block_size=cfg.block_size, ckpt=ckpt, eot=eot_id, vocab_size=cfg.vocab_size,
            n_vocab=n_vocab, out=out))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None, prog: str = "export") -> int:
    p = OneLineErrorParser(prog=prog,
                           description="Export a StoryLlama checkpoint to a Hugging Face LlamaForCausalLM directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: exports its latest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint directory")
    p.add_argument("--out", required=True, help="the directory to write (config.json, model.safetensors, ...)")
    ns = p.parse_args(argv)
    try:
        out = export(ns.run or ns.checkpoint, ns.out)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (config.json, generation_config.json, model.safetensors, tokenizer.tiktoken, meta.json, "
          "README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
