"""Export a checkpoint to a Hugging Face `LlamaForCausalLM` directory, or to a GGUF file for llama.cpp:

    HF_DIR/config.json          LlamaConfig (written here from storyllama.hf.hf_config_dict)
    HF_DIR/model.safetensors    weights under transformers' names (RoPE is already in its half-split layout)
    HF_DIR/generation_config.json   EOT as eos, and the padded vocabulary ids suppressed
    HF_DIR/tokenizer.json, tokenizer_config.json   a Hugging Face tokenizer with our ids (EOT as eos), so
                                `AutoTokenizer.from_pretrained` and `pipeline("text-generation")` load it
    HF_DIR/meta.json + tokenizer.tiktoken (or tokenizer.json)   our own tokenizer files (meta.json holds the
                                tokenizer entry only: the data's source paths stay on the machine that trained it)
    HF_DIR/README.md            how to load it
    HF_DIR/.storyllama-export.json   the marker: which files this export wrote

    bin/export --format gguf [--dtype f32|f16|bf16|q8_0] --out MODEL.gguf   (see storyllama.gguf_export)

Nothing written names a path of the machine that wrote it: the README says "RUN, step N" (checkpoint.describe).

transformers is not needed to export, only to load. The output is written under a temporary name and
renamed when complete. An existing --out is replaced only when it is an earlier export (its marker
lists every file in it); a run directory or anything else is refused, and so is a second export to the
same --out while one runs (a lock on the temporary directory).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from storyllama.checkpoint import (
    EMA_WEIGHTS,
    add_trust_flag,
    describe,
    load_model_config,
    read_weights,
    resolve,
    tokenizer_info,
    trust_unverified,
    weights_file,
)
from storyllama.config import ModelConfig, OneLineErrorParser
from storyllama.hf import hf_config_dict, to_hf_state_dict
from storyllama.staging import Staging, check_out, publish_dir

_README = """\
# {name}

A StoryLlama model ({params:,} parameters: dim {dim}, {n_layers} layers, {n_heads} heads, {n_kv_heads} KV heads,
context {block_size}) exported from {source} for Hugging Face transformers.

`tokenizer.json` is a Hugging Face tokenizer giving the same ids as the model's own tokenizer ({tok_name},
end of text {eot_text!r} = {eot}). The model's vocabulary is padded to {vocab_size}; ids from {n_vocab} up
never occur in text (`generation_config.json` suppresses them in `generate`).

```python
from transformers import pipeline

story = pipeline("text-generation", model="{out}")  # this directory
print(story("Once upon a time", max_new_tokens=200, do_sample=True, temperature=0.8)[0]["generated_text"])
```

`meta.json` and the tokenizer file it names are the StoryLlama tokenizer files
(`storyllama.data_prep.tokenizer.load_encoding(path)` reads them).
"""


def hf_config_json(cfg: ModelConfig, eot_id: int | None) -> dict:
    """config.json for transformers 4.x and 5.x alike (both rope_theta and rope_parameters)."""
    conf = hf_config_dict(cfg)
    conf["dtype"] = conf["torch_dtype"]
    conf["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    conf.update(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None, use_cache=True,
                initializer_range=0.02, attention_dropout=0.0, pretraining_tp=1)
    return conf


def hf_tokenizer_for(ckpt: Path):
    """The checkpoint's tokenizer as a `tokenizers.Tokenizer` with the same ids (EOT a special token)."""
    from storyllama.data_prep.tokenizer import EOT, load_encoding, load_ranks

    tok = tokenizer_info(ckpt)
    if tok.get("kind") == "hf":
        return load_encoding(ckpt).tokenizer
    from storyllama.data_prep.hf_tokenizer import ranks_to_hf_tokenizer

    ranks = load_ranks(ckpt / tok["file"])
    return ranks_to_hf_tokenizer(ranks, tok["pat_str"], {tok.get("special", EOT): tok["eot_id"]})


def export(path: str | Path, out: str | Path, format: str = "hf", weights: str = "auto", dtype: str = "f32") -> Path:
    """Write the HF directory (or, format="gguf", the GGUF file in precision `dtype`: f32, f16, bf16 or q8_0) for
    checkpoint `path` (or a run's latest), with its EMA weights when it has them (weights="auto"), or
    weights="ema" / "raw".

    Raises CheckpointError for a missing or partial checkpoint, ValueError when `out` exists and is not an
    earlier export, LockedError (a ValueError) when another export writes to `out` now.
    """
    if format == "gguf":
        from storyllama.gguf_export import export_gguf

        return export_gguf(path, out, weights, dtype)
    if format != "hf":
        raise ValueError(f"--format {format!r} is not known: use hf or gguf")
    if dtype != "f32":
        raise ValueError(f"--dtype {dtype} is for --format gguf; the hf export is float32 (transformers casts it on "
                         "load: from_pretrained(..., dtype=torch.bfloat16))")
    ckpt = resolve(path)
    cfg = load_model_config(ckpt)
    out = Path(out)
    check_out(out)
    tok = tokenizer_info(ckpt)
    state = read_weights(ckpt, weights)  # checked against the checkpoint's checksums
    hf_state = to_hf_state_dict(state, cfg)
    if cfg.tie_embeddings:
        # safetensors refuses two names for one tensor; transformers ties lm_head to the embedding on load.
        del hf_state["lm_head.weight"]
    eot_id, n_vocab = tok["eot_id"], tok["vocab_size"]
    hf_tok = hf_tokenizer_for(ckpt)
    eot_text = hf_tok.id_to_token(eot_id)

    out.parent.mkdir(parents=True, exist_ok=True)
    with Staging(out) as tmp:
        save_file({k: v.contiguous() for k, v in hf_state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_json(cfg, eot_id), indent=2) + "\n")
        gen = {"bos_token_id": eot_id, "eos_token_id": eot_id}
        if n_vocab < cfg.vocab_size:
            # The model's rows past the tokenizer's vocabulary (padding to a multiple of 64) are untrained:
            # `generate` must never pick them (our sampler computes only the tokenizer's rows).
            gen["suppress_tokens"] = list(range(n_vocab, cfg.vocab_size))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        files = ["model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "README.md",
                 "meta.json"]
        if tok.get("kind") != "hf":  # ours is a ranks file; an imported tokenizer.json travels as it is
            hf_tok.save(str(tmp / "tokenizer.json"))
            files.append("tokenizer.json")
        shutil.copy2(ckpt / tok["file"], tmp / tok["file"])
        # meta.json with the tokenizer entry only: the data's source (absolute paths of the files it was prepared
        # from, or an import's source path) stays on the machine that trained the model
        public_tok = {k: v for k, v in tok.items() if k != "source"}
        (tmp / "meta.json").write_text(json.dumps({"tokenizer": public_tok}, indent=2) + "\n")
        files.append(tok["file"])
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(hf_tok, eot_text, cfg), indent=2)
                                                   + "\n")
        (tmp / "README.md").write_text(_README.format(
            name=out.name, params=cfg.num_params(), dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads, block_size=cfg.block_size, source=describe(ckpt), eot=eot_id,
            eot_text=eot_text, vocab_size=cfg.vocab_size, n_vocab=n_vocab, out=out.name, tok_name=tok.get("name")))
        publish_dir(tmp, out, sorted(set(files)))
    return out


def tokenizer_config(hf_tok, eot_text: str, cfg: ModelConfig) -> dict:
    """tokenizer_config.json for transformers' fast tokenizer over tokenizer.json (EOT as eos, no added BOS
    beyond what tokenizer.json's own post-processor does)."""
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot_text, "model_max_length": cfg.block_size,
            "clean_up_tokenization_spaces": False}
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    for key, name in (("bos_token", "<s>"), ("unk_token", "<unk>")):
        if name in vocab:
            conf[key] = name
    return conf


def main(argv: list[str] | None = None, prog: str = "export") -> int:
    p = OneLineErrorParser(prog=prog, description="Export a StoryLlama checkpoint to a Hugging Face LlamaForCausalLM "
                           "directory (--format hf) or a GGUF file for llama.cpp / Ollama (--format gguf).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: exports its latest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint directory")
    p.add_argument("--out", required=True, help="the directory (hf) or file (gguf) to write")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default): a transformers directory; "
                   "gguf: one GGUF file for llama.cpp / Ollama, and NAME.Modelfile beside it")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32", help="the GGUF's precision "
                   "(llama.cpp's names; norms stay f32): f32 (default), f16, bf16 or q8_0 (8-bit, smallest)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="ema: the averaged weights of a run trained with --ema_decay; raw: the trained ones; auto "
                   "(default): ema when the checkpoint has them")
    add_trust_flag(p)
    ns = p.parse_args(argv)
    trust_unverified(ns.trust_unverified)
    try:
        src = resolve(ns.run or ns.checkpoint)
        if weights_file(src, ns.weights) == EMA_WEIGHTS:
            print(f"exporting the EMA weights of {src} ({EMA_WEIGHTS}; --weights raw for the trained ones)",
                  file=sys.stderr)
        out = export(src, ns.out, ns.format, ns.weights, ns.dtype)
    except (ValueError, OSError) as e:  # CheckpointError and LockedError are ValueErrors
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if ns.format == "gguf":
        from storyllama.staging import modelfile_path

        print(f"wrote {out} (GGUF, llama architecture, {ns.dtype}) and {modelfile_path(out)} "
              f"(ollama create NAME -f {modelfile_path(out).name})")
    else:
        print(f"wrote {out} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json, "
              "generation_config.json, meta.json, README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
