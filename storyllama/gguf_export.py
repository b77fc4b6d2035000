"""Export a checkpoint to one GGUF file (llama.cpp's format, written with its own `gguf` package).

    bin/export --run RUN_DIR --format gguf [--dtype f32|f16|bf16|q8_0] --out story.gguf
    (writes story.gguf and, beside it, story.Modelfile for `ollama create story -f story.Modelfile`)

What llama.cpp reads for a Llama ("llama" architecture):
- hyper-parameters: llama.context_length, embedding_length, block_count, feed_forward_length,
  attention.head_count(_kv), rope.dimension_count (head_dim), rope.freq_base, attention.layer_norm_rms_epsilon;
- tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), in the precision asked
  for (`DTYPES`, llama.cpp's names), quantised by the gguf package itself (`gguf.quants.quantize`). As llama.cpp's
  convert_hf_to_gguf.py does: 1-D tensors (the norms) stay float32; every matrix, token_embd and output included,
  takes the file's type; a matrix whose rows are not whole Q8_0 blocks (32 values) falls back to f16, with a
  warning; general.file_type says the file's type;
- the tokenizer: tokenizer.ggml.model = "gpt2" (byte-level BPE), tokenizer.ggml.pre = "gpt-2" (our BPEs
  split text with GPT-2's pattern; llama.cpp cannot recognise a corpus-trained BPE by its hash, so we name
  it), the tokens in id order (byte-level strings, as in tokenizer.json), their types, the merges, and
  EOT as both bos and eos (add_bos false: our documents start after an EOT, never with a BOS). An imported
  SentencePiece-style tokenizer (llama2.c's, Llama-2's) goes as llama.cpp's "llama" tokenizer instead:
  tokens, scores and types (see `gguf_vocab`).

RoPE layout: our q and k rows are in the half-split layout (pairs (i, i + D/2) of each head, as in
transformers); llama.cpp's Llama rotates adjacent pairs (2i, 2i + 1), Meta's original layout. So wq and wk
are permuted per head: row i of the first half goes to 2i, row i of the second half to 2i + 1
(`to_interleaved`).

Vocabulary: exactly the tokenizer's rows. The model's padding rows past the tokenizer (50,304 against GPT-2's
50,257) are untrained and decode to nothing; they are cut from token_embd and output, so llama.cpp can never
sample one, and llama.vocab_size is the tokenizer's size.

Nothing in the file names a path of the machine that wrote it: `storyllama.exported_from` (the marker that the
file is ours, see storyllama.staging) holds "RUN, step N".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from storyllama.checkpoint import CheckpointError, describe, load_model_config, read_weights, resolve, tokenizer_info
from storyllama.config import ModelConfig
from storyllama.staging import GGUF_MARKER, MODELFILE_HEADER, Staging, check_out, modelfile_path

log = logging.getLogger(__name__)

# --dtype (llama.cpp's names) -> (the matrices' GGML type name, general.file_type name), resolved in `_types`
DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

# our name -> llama.cpp's, per layer
_LAYER = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Half-split RoPE rows -> adjacent-pair rows, per head (see the module docstring)."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, D/2, 2, C) -> (H*D, C)


def to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Adjacent-pair RoPE rows (Meta, llama2.c, llama.cpp) -> half-split rows (ours, transformers')."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.view(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, 2, D/2, C) -> (H*D, C)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, n_vocab: int | None = None) -> dict[str, np.ndarray]:
    """Our state dict -> llama.cpp's tensor names and layout (float32 numpy arrays); token_embd and output keep
    their first `n_vocab` rows (the tokenizer's), all of them when None."""
    rows = slice(0, n_vocab)
    out = {"token_embd.weight": state["tok_embeddings.weight"][rows], "output_norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = state["output.weight"][rows]  # absent: llama.cpp uses token_embd for the head
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER.items():
            w = state[f"layers.{i}.{ours}"]
            if ours == "attention.wq.weight":
                w = to_interleaved(w, cfg.n_heads)
            elif ours == "attention.wk.weight":
                w = to_interleaved(w, cfg.n_kv_heads)
            out[f"blk.{i}.{theirs}"] = w
    return {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in out.items()}


def _types(dtype: str):
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not known: use one of {', '.join(DTYPES)}")
    qtype, ftype = DTYPES[dtype]
    return gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[ftype]


def quantize_tensor(name: str, arr: np.ndarray, dtype: str):
    """(data, GGML type) for one float32 tensor in the file's precision `dtype`: 1-D tensors stay F32; a matrix
    takes the dtype through gguf.quants.quantize, or F16 when its rows are not whole blocks (llama.cpp's
    converter does the same)."""
    import gguf

    qtype = _types(dtype)[0] if arr.ndim >= 2 else gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except gguf.QuantError as e:
        log.warning("%s: %s; writing it as F16 (as llama.cpp's converter does)", name, e)
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def gguf_vocab(ckpt: Path, tok: dict, cfg: ModelConfig) -> dict:
    """The tokenizer as llama.cpp wants it: model, pre, tokens (exactly the tokenizer's, in id order), types,
    merges or scores, and the end-of-text token's text ("eot_text").

    - our tiktoken ranks, or an imported byte-level BPE tokenizer.json: model "gpt2", pre "gpt-2", merges;
    - an imported SentencePiece-style tokenizer.json (Llama-2's, llama2.c's: byte fallback, "▁" for spaces):
      model "llama", scores (minus the rank of the merge that makes each token), byte tokens.
    The model's rows past the tokenizer (padding to a multiple of 64) are not tokens: the export cuts them.
    """
    eot_id = tok["eot_id"]
    out = _ranks_vocab(ckpt, tok) if tok.get("kind") != "hf" else _hf_vocab(ckpt, eot_id)
    if len(out["tokens"]) > cfg.vocab_size:
        raise CheckpointError(f"checkpoint {ckpt}: the tokenizer has {len(out['tokens']):,} tokens, the model "
                              f"{cfg.vocab_size:,} rows")
    if not 0 <= eot_id < len(out["tokens"]):
        raise CheckpointError(f"checkpoint {ckpt}: eot_id {eot_id} is not one of the tokenizer's "
                              f"{len(out['tokens']):,} tokens")
    out["eot_text"] = out["tokens"][eot_id]
    if out["model"] == "gpt2" and not out["merges"] and " " not in out["eot_text"]:
        # A vocabulary of single bytes has no merges, but llama.cpp refuses a gpt2 tokenizer without the merges
        # key, and the gguf package writes no empty array: one merge that can never apply (BPE starts from single
        # characters and no merge makes the multi-character EOT text, so the pair never forms).
        out["merges"] = [f"{out['eot_text']} {out['eot_text']}"]
    return out


def _ranks_vocab(ckpt: Path, tok: dict) -> dict:
    """Our tiktoken ranks (gpt2, bpe:N) as llama.cpp's gpt2 tokenizer: the ranks' tokens and merges, then EOT."""
    import gguf

    from storyllama.data_prep.hf_tokenizer import ranks_to_tokens_and_merges
    from storyllama.data_prep.tokenizer import load_ranks

    T, eot_id = gguf.TokenType, tok["eot_id"]
    ranks = load_ranks(ckpt / tok["file"])
    tokens, pairs = ranks_to_tokens_and_merges(ranks)
    if eot_id != len(tokens):
        raise CheckpointError(f"{ckpt / 'meta.json'}: eot_id {eot_id} does not follow the {len(tokens):,} ranks")
    tokens.append(tok.get("special", "<|endoftext|>"))
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": [T.NORMAL] * len(ranks) + [T.CONTROL],
            "merges": [f"{a} {b}" for a, b in pairs], "bos": eot_id, "eos": eot_id, "add_bos": False}


def _hf_vocab(ckpt: Path, eot_id: int) -> dict:
    """An imported tokenizer.json (a BPE model): byte-level as gpt2, SentencePiece-style with byte fallback as
    llama; anything else is refused with the way out (llama.cpp's own converter)."""
    import gguf

    from storyllama.data_prep.tokenizer import load_encoding

    T = gguf.TokenType
    hf = load_encoding(ckpt).tokenizer
    conf = json.loads(hf.to_str())
    model = conf.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"checkpoint {ckpt}: its tokenizer.json is a {model.get('type')} model; GGUF export "
                         "handles BPE tokenizers only (byte-level, or SentencePiece-style with byte fallback)")
    vocab = hf.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    added = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    dumped = json.dumps(conf.get("pre_tokenizer")) + json.dumps(conf.get("decoder"))
    if '"ByteLevel"' in dumped:
        pre = conf.get("pre_tokenizer") or {}
        pats = [json.dumps(x) for x in ([pre] + pre.get("pretokenizers", []))]
        gpt2_split = any('"Split"' in x and "p{L}+" in x for x in pats) or (pre.get("type") == "ByteLevel" and
                                                                          pre.get("use_regex", True))
        if not gpt2_split:
            raise ValueError(f"checkpoint {ckpt}: its byte-level tokenizer.json splits text in a way llama.cpp's "
                             "gpt-2 pre-tokenizer may not; convert the --format hf export with llama.cpp's own "
                             "convert_hf_to_gguf.py instead")
        types = [T.CONTROL if i in added else T.NORMAL for i in range(len(tokens))]
        return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges,
                "bos": eot_id, "eos": eot_id, "add_bos": False}
    if not model.get("byte_fallback"):
        raise ValueError(f"checkpoint {ckpt}: its tokenizer.json is neither byte-level nor SentencePiece-style "
                         "with byte fallback; convert the --format hf export with llama.cpp's "
                         "convert_hf_to_gguf.py")
    # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest; a token's score
    # here is minus the rank of the first merge that makes it (tokenizer.json keeps no scores).
    made_at: dict[str, int] = {}
    for rank, m in enumerate(merges):
        made_at.setdefault(m.replace(" ", "", 1), rank)
    unk = model.get("unk_token")
    types, scores = [], []
    for i, t in enumerate(tokens):
        kind = (T.UNKNOWN if t == unk else T.CONTROL if i in added else
                T.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else T.NORMAL)
        types.append(kind)
        scores.append(-float(made_at.get(t, 0 if len(t) == 1 else 1e9)) if kind == T.NORMAL else 0.0)
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": vocab.get("<s>", eot_id),
            "eos": eot_id, "add_bos": "<s>" in vocab}


def modelfile_text(gguf_name: str, eot_text: str, n_ctx: int, source: str) -> str:
    """The Ollama Modelfile beside the GGUF: the file, the raw prompt (a story model has no chat template), the
    end-of-text stop and the trained context (Ollama's default num_ctx is not the model's)."""
    stop = eot_text.replace("\\", "\\\\").replace('"', '\\"')
    return (f"{MODELFILE_HEADER}\n"
            f"# from {source}: ollama create NAME -f {Path(gguf_name).stem}.Modelfile && ollama run NAME 'Once upon'\n"
            f"FROM ./{gguf_name}\n"
            'TEMPLATE "{{ .Prompt }}"\n'
            f'PARAMETER stop "{stop}"\n'
            f"PARAMETER num_ctx {n_ctx}\n")


def export_gguf(path: str | Path, out: str | Path, weights: str = "auto", dtype: str = "f32") -> Path:
    """Write checkpoint `path` (or a run's latest) as the GGUF file `out` in precision `dtype` (see `DTYPES`),
    and the Ollama Modelfile beside it (`staging.modelfile_path`); weights: see checkpoint.weights_file.
    Returns `out`."""
    import gguf

    _, ftype = _types(dtype)
    ckpt = resolve(path)
    cfg = load_model_config(ckpt)
    out = Path(out)
    check_out(out, kind="file")
    tok = tokenizer_info(ckpt)
    vocab = gguf_vocab(ckpt, tok, cfg)
    n_vocab = len(vocab["tokens"])
    state = read_weights(ckpt, weights)  # checked against the checkpoint's checksums
    source = describe(ckpt)  # "RUN, step N": no path of this machine goes into the file
    mf = modelfile_path(out)

    out.parent.mkdir(parents=True, exist_ok=True)
    with Staging(out) as tmp:
        w = gguf.GGUFWriter(str(tmp / out.name), "llama")
        w.add_name(out.stem)
        w.add_string(GGUF_MARKER, source)  # marks the file as ours (a re-export may replace it)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_vocab_size(n_vocab)  # the tokenizer's rows only (the model's padding rows are cut)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model(vocab["model"])
        if vocab.get("pre"):
            w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types([int(t) for t in vocab["types"]])
        if vocab.get("scores") is not None:
            w.add_token_scores(vocab["scores"])
        if vocab.get("merges"):
            w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_add_bos_token(vocab["add_bos"])
        if vocab["model"] == "llama":
            w.add_add_space_prefix(True)
        for name, arr in gguf_tensors(state, cfg, n_vocab).items():
            data, qtype = quantize_tensor(name, arr, dtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        (tmp / mf.name).write_text(modelfile_text(out.name, vocab["eot_text"], cfg.block_size, source))
        for name in (out.name, mf.name):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        check_out(out, kind="file")  # again, now that the files are written: nothing changed underneath us
        os.replace(tmp / out.name, out)
        os.replace(tmp / mf.name, mf)  # after the GGUF: an old Modelfile names the same ./NAME.gguf
    return out


def gguf_metadata(path: str | Path) -> dict:
    """The GGUF file's key-value metadata as plain Python values (strings, numbers, lists), for tests and tools."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


if __name__ == "__main__":  # python -m storyllama.gguf_export FILE: print the metadata (lists shortened)
    import sys

    meta = gguf_metadata(sys.argv[1])
    print(json.dumps({k: (v[:8] + ["..."] if isinstance(v, list) and len(v) > 8 else v) for k, v in meta.items()},
                     indent=1, default=str))
