"""bin/import: a pretrained Llama in, an ordinary StoryLlama run directory out.

    bin/import SOURCE --out RUN_DIR

SOURCE is one of
- a transformers Llama directory (config.json, model.safetensors[.index.json] or pytorch_model.bin, and
  tokenizer.json or a SentencePiece tokenizer.model);
- a hub id (`owner/name`): downloaded once into the Hugging Face cache with huggingface_hub;
- a llama2.c checkpoint (`ckpt.pt`: {"model": state dict, "model_args": {...}}) with its SentencePiece
  `tokenizer.model` beside it (or --tokenizer PATH). It is loaded with torch.load(weights_only=True): an
  untrusted file can hold tensors and plain values, never code. llama2.c keeps q and k in Meta's
  interleaved RoPE layout; ours is half-split (transformers'), so wq and wk are permuted per head.

RUN_DIR is what the trainer writes: checkpoints/step_000000/{model.safetensors, model_config.json,
trainer_state.json, optimizer.pt (a fresh AdamW), meta.json, tokenizer.json} and checkpoints/latest, with
meta.json + tokenizer.json also at the top (as bin/train leaves them). So bin/sample --run, bin/export,
bin/train --resume auto (on data prepared with `--tokenizer hf:RUN_DIR`) and --eval_only take it.
The tokenizer is kept as a Hugging Face tokenizer.json (converted from tokenizer.model when needed); its
end-of-text id is the model's eos, or for llama2.c the BOS id 1 (llama2.c separates stories by BOS).

Configurations our Llama cannot represent are refused by name, before anything is written: rope scaling,
attention or MLP biases, an activation other than SiLU, a head_dim other than hidden_size / heads, a
vocabulary over 65,536, a directory without weights. The output is written to a locked temporary
sibling and renamed; an existing non-empty --out is refused unless it is an untouched earlier import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from storyllama.config import DROPOUT_RATES, MODEL_LIMITS, ModelConfig, OneLineErrorParser
from storyllama.inputs import InputError, NumberError, Real, read_json

MARKER = ".storyllama-import.json"
MAX_VOCAB = 65_536
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


class ImportRefused(ValueError):
    """A source we cannot import (or an --out we may not write); the message is one sentence."""


# ---------------------------------------------------------------------------------------------
# Reading sources


def _read_json(path: Path) -> dict:
    try:
        return read_json(path)
    except InputError as e:
        raise ImportRefused(str(e)[:300]) from None


def _rope_theta(conf: dict, where: Path):
    rp = conf.get("rope_parameters")
    scaling = conf.get("rope_scaling")
    for r in (rp, scaling):
        if isinstance(r, dict) and r.get("rope_type", r.get("type", "default")) not in ("default", None):
            raise ImportRefused(f"{where} uses rope scaling ({r.get('rope_type', r.get('type'))}), which StoryLlama's "
                                "RoPE does not implement; this model cannot be imported")
    theta = conf.get("rope_theta")
    if theta is None and isinstance(rp, dict):
        theta = rp.get("rope_theta")
    return theta if theta is not None else 10000.0  # checked by the caller


# What an imported config may say: the type and range of each number (config.MODEL_LIMITS, the one table every
# configuration is checked against), checked before anything is built, so a wrong-typed, missing, zero, negative
# or absurd value is one line naming the field (never a KeyError, a division by zero or a huge allocation).
def checked_int(value, name: str, where, field: str | None = None) -> int:
    """An integer field of an imported config within MODEL_LIMITS[field], or ImportRefused naming it."""
    try:
        return MODEL_LIMITS[field or name].check(value, name)
    except NumberError as e:
        raise ImportRefused(f"{where}: {e}") from None


def checked_float(value, name: str, where, low: float, high: float) -> float:
    try:
        return Real(low, high, low_open=True, high_open=True).check(value, name)
    except NumberError as e:
        raise ImportRefused(f"{where}: {e}") from None


def _require(conf: dict, key: str, where):
    if key not in conf or conf[key] is None:
        raise ImportRefused(f"{where} has no {key}; it does not describe a model that can be imported")
    return conf[key]


def config_from_hf(conf: dict, where: Path) -> ModelConfig:
    """LlamaConfig (config.json) -> ModelConfig, refusing by name what our model cannot represent."""
    archs = conf.get("architectures") if isinstance(conf.get("architectures"), list) else []
    if conf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ImportRefused(f"{where} describes a {conf.get('model_type') or archs or 'unknown'} model; only Llama "
                            "(model_type llama, LlamaForCausalLM) can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if conf.get(key):
            raise ImportRefused(f"{where} has {key}: true; StoryLlama's Llama has no biases, so it cannot be imported")
    act = conf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ImportRefused(f"{where} uses the activation {act!r}; StoryLlama's MLP is SwiGLU (SiLU) only")
    theta = checked_float(_rope_theta(conf, where), "rope_theta", where, 0.0, 1e12)
    vocab = _require(conf, "vocab_size", where)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > MAX_VOCAB:
        raise ImportRefused(f"{where} has a vocabulary of {vocab:,} tokens, more than the {MAX_VOCAB:,} that uint16 "
                            "token shards hold; this model cannot be imported")
    vocab = checked_int(vocab, "vocab_size", where)
    dim = checked_int(_require(conf, "hidden_size", where), "hidden_size", where, "dim")
    heads = checked_int(_require(conf, "num_attention_heads", where), "num_attention_heads", where, "n_heads")
    head_dim = conf.get("head_dim")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim * heads != dim):
        raise ImportRefused(f"{where} has head_dim {str(head_dim)[:20]} with hidden_size {dim} and {heads} heads; "
                            f"StoryLlama needs head_dim = hidden_size / heads = {dim // heads}")
    kv = conf.get("num_key_value_heads")
    eps = conf.get("rms_norm_eps", 1e-6)
    return build_config(where, vocab_size=vocab, dim=dim, n_heads=heads,
                        n_layers=checked_int(_require(conf, "num_hidden_layers", where), "num_hidden_layers", where,
                                             "n_layers"),
                        n_kv_heads=heads if kv is None else checked_int(kv, "num_key_value_heads", where, "n_kv_heads"),
                        block_size=checked_int(conf.get("max_position_embeddings", 2048), "max_position_embeddings",
                                               where, "block_size"),
                        hidden_dim=checked_int(_require(conf, "intermediate_size", where), "intermediate_size", where,
                                               "hidden_dim"),
                        norm_eps=checked_float(eps, "rms_norm_eps", where, 0.0, 1.0), rope_theta=theta,
                        tie_embeddings=_checked_bool(conf.get("tie_word_embeddings", False), "tie_word_embeddings",
                                                     where))


def _checked_bool(value, name: str, where) -> bool:
    if not isinstance(value, bool):
        raise ImportRefused(f"{where}: {name} must be true or false, got {str(value)[:40]}")
    return value


def build_config(where, **kw) -> ModelConfig:
    """ModelConfig from checked values; its own checks (heads dividing dim, ...) become one line naming `where`."""
    try:
        return ModelConfig(dropout=0.0, **kw)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise ImportRefused(f"{where} does not describe a model StoryLlama can build ({e})") from None


def _load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    def read(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own errors for empty, cut or corrupt files; OSError
            raise ImportRefused(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100] if str(e) else 'unreadable'}); the file is damaged "
                                "or incomplete: download or copy it again") from None

    if (src / "model.safetensors").is_file():
        return read(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and v not in (".", "..")
                                                       for v in weight_map.values()):
            raise ImportRefused(f"{index} has no usable weight_map (file names beside it)")
        for shard in sorted(set(weight_map.values())):
            state.update(read(src / shard))
        return state
    if (src / "pytorch_model.bin").is_file():
        return _torch_load(src / "pytorch_model.bin")
    raise ImportRefused(f"{src} has no weights (model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin); nothing to import")


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors: the file holds more than tensors and plain values
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImportRefused(f"{path} cannot be loaded as plain tensors (torch.load weights_only=True: {first}); "
                            "StoryLlama never unpickles code from a checkpoint") from None


def _hf_tokenizer(src: Path, eot_hint: int | None):
    """(HFEncoding, source note) for a transformers directory: its tokenizer.json, else its tokenizer.model."""
    from storyllama.data_prep.hf_tokenizer import (
        HFEncoding,
        HFTokenizerError,
        load_hf_encoding,
        sentencepiece_to_hf_tokenizer,
    )

    try:
        if (src / "tokenizer.json").is_file():
            return load_hf_encoding(src / "tokenizer.json", eot_id=eot_hint)
        if (src / "tokenizer.model").is_file():
            tok, _bos, eos = sentencepiece_to_hf_tokenizer(src / "tokenizer.model")
            return HFEncoding(tok, eot_hint if eot_hint is not None else eos, where=str(src / "tokenizer.model"))
    except HFTokenizerError as e:
        raise ImportRefused(str(e)) from None
    raise ImportRefused(f"{src} has no tokenizer (tokenizer.json or tokenizer.model); a model without its tokenizer "
                        "cannot write stories")


def _eos_id(src: Path) -> int | None:
    for name in ("generation_config.json", "config.json"):
        if (src / name).is_file():
            eos = _read_json(src / name).get("eos_token_id")
            if isinstance(eos, list) and eos:
                eos = eos[0]
            if isinstance(eos, int):
                return eos
    return None


def read_transformers_dir(src: Path):
    """(ModelConfig, our state dict, HFEncoding) from a transformers Llama directory."""
    from storyllama.hf import from_hf_state_dict, hf_weight_names

    if not (src / "config.json").is_file():
        raise ImportRefused(f"{src} has no config.json: it is not a transformers model directory")
    conf = _read_json(src / "config.json")
    cfg = config_from_hf(conf, src / "config.json")
    enc = _hf_tokenizer(src, _eos_id(src))  # before the weights: a refusal costs nothing
    hf_state = _load_hf_weights(src)
    hf_state = {k.removeprefix("_orig_mod."): v for k, v in hf_state.items()}
    biases = [k for k in hf_state if k.endswith(".bias")]
    if biases:
        raise ImportRefused(f"{src} holds bias tensors ({biases[0]}, ...); StoryLlama's Llama has no biases")
    if cfg.tie_embeddings and "lm_head.weight" in hf_state and not torch.equal(
            hf_state["lm_head.weight"], hf_state["model.embed_tokens.weight"]):
        cfg.tie_embeddings = False  # config says tied, weights differ: keep both
    if not cfg.tie_embeddings and "lm_head.weight" not in hf_state:
        raise ImportRefused(f"{src}: tie_word_embeddings is false but the weights have no lm_head.weight")
    names = set(hf_weight_names(cfg))
    missing = [k for k in names if k not in hf_state]
    if missing:
        raise ImportRefused(f"{src}: the weights lack {missing[0]} (and {len(missing) - 1} more) for the model its "
                            "config.json describes")
    # rotary tables are recomputed; a tied head may be stored twice; anything else the config does not describe
    extra = sorted(k for k in hf_state if k not in names and not k.endswith("rotary_emb.inv_freq")
                   and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if extra:
        raise ImportRefused(f"{src}: the weights hold {len(extra)} tensor(s) its config.json does not describe "
                            f"({', '.join(extra[:2])}, ...); the config and the weights do not belong together "
                            "(nothing was written)")
    return cfg, from_hf_state_dict(hf_state, cfg), enc


def read_llama2c(pt: Path, tokenizer_model: Path | None = None):
    """(ModelConfig, our state dict, HFEncoding) from a llama2.c checkpoint and its tokenizer.model."""
    from storyllama.data_prep.hf_tokenizer import HFEncoding, HFTokenizerError, sentencepiece_to_hf_tokenizer
    from storyllama.gguf_export import to_half_split

    tok_path = tokenizer_model or pt.with_name("tokenizer.model")
    if not tok_path.is_file():
        raise ImportRefused(f"{pt} needs its SentencePiece tokenizer: no {tok_path}; pass --tokenizer "
                            "PATH/TO/tokenizer.model (llama2.c's stories models use Llama-2's)")
    ckpt = _torch_load(pt)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ImportRefused(f"{pt} is not a llama2.c checkpoint (a dict with 'model' and 'model_args')")
    if not isinstance(ckpt["model_args"], dict) or not isinstance(ckpt["model"], dict) or not all(
            isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise ImportRefused(f"{pt} is not a llama2.c checkpoint ('model_args' a dict, 'model' a dict of tensors)")
    args = dict(ckpt["model_args"])
    state = {str(k).removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    where = f"{pt} (model_args)"
    n_heads = checked_int(_require(args, "n_heads", where), "n_heads", where)
    n_kv = args.get("n_kv_heads")
    n_kv = n_heads if n_kv is None else checked_int(n_kv, "n_kv_heads", where)
    vocab = _require(args, "vocab_size", where)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > MAX_VOCAB:
        raise ImportRefused(f"{pt} has a vocabulary of {vocab:,} tokens, more than the {MAX_VOCAB:,} that uint16 "
                            "token shards hold; this model cannot be imported")
    emb, head = state.get("tok_embeddings.weight"), state.get("output.weight")
    if emb is None or "layers.0.feed_forward.w1.weight" not in state:
        raise ImportRefused(f"{pt}'s 'model' holds no Llama weights (tok_embeddings.weight, layers.N....)")
    tied = head is None or (head.shape == emb.shape and torch.equal(head, emb))
    cfg = build_config(where, vocab_size=checked_int(vocab, "vocab_size", where),
                       dim=checked_int(_require(args, "dim", where), "dim", where),
                       n_layers=checked_int(_require(args, "n_layers", where), "n_layers", where), n_heads=n_heads,
                       n_kv_heads=n_kv, block_size=checked_int(args.get("max_seq_len", 256), "max_seq_len", where,
                                                               "block_size"),
                       hidden_dim=checked_int(int(state["layers.0.feed_forward.w1.weight"].shape[0]), "hidden_dim",
                                              where),
                       norm_eps=checked_float(args.get("norm_eps", 1e-5), "norm_eps", where, 0.0, 1.0),
                       rope_theta=checked_float(args.get("rope_theta", 10000.0), "rope_theta", where, 0.0, 1e12),
                       tie_embeddings=tied)
    ours: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "output.weight" and tied:
            continue
        if k.endswith(".attention.wq.weight"):
            v = to_half_split(v, n_heads)
        elif k.endswith(".attention.wk.weight"):
            v = to_half_split(v, n_kv)
        elif k.endswith((".mask", "freqs_cos", "freqs_sin", "freqs_cis")):
            continue  # buffers recomputed by our model
        ours[k] = v
    try:
        tok, bos, _eos = sentencepiece_to_hf_tokenizer(tok_path)
        # llama2.c trains on stories each preceded by BOS (id 1) and stops sampling at BOS: that is its
        # document separator, so it is our end-of-text.
        enc = HFEncoding(tok, bos if bos is not None else 1, where=str(tok_path))
    except HFTokenizerError as e:
        raise ImportRefused(str(e)) from None
    return cfg, ours, enc


def _is_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None and not source.endswith((".pt", ".pth"))


def download(repo_id: str) -> Path:
    """The hub model's files (config, weights, tokenizer) through huggingface_hub's cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportRefused(f"{repo_id} looks like a hub id, but huggingface_hub is not installed; pip install "
                            "huggingface_hub, or pass a local model directory") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, DNS, proxy, missing repo, gated repo: huggingface_hub's many error types
        kind = type(e).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise ImportRefused(f"the Hugging Face hub has no model {repo_id} you can download ({kind}); check the "
                                "id, or pass a local model directory") from None
        raise ImportRefused(f"cannot reach the Hugging Face hub to download {repo_id} ({kind}); download it where "
                            f"there is network (huggingface-cli download {repo_id}) and pass the local directory: "
                            "bin/import PATH/TO/MODEL_DIR --out RUN_DIR") from None


def read_source(source: str | Path, tokenizer_model: str | Path | None = None):
    """(ModelConfig, our state dict in float32, HFEncoding, description of the source)."""
    path = Path(source)
    if path.is_dir():
        cfg, state, enc = read_transformers_dir(path)
    elif path.is_file():
        cfg, state, enc = read_llama2c(path, Path(tokenizer_model) if tokenizer_model else None)
    elif _is_hub_id(str(source)):
        cfg, state, enc = read_transformers_dir(download(str(source)))
    else:
        raise ImportRefused(f"{source} is neither a file, a directory nor a hub id (owner/name); pass a transformers "
                            "model directory, a llama2.c .pt checkpoint or a hub id")
    if enc.n_vocab > cfg.vocab_size:
        raise ImportRefused(f"{source}: the tokenizer has {enc.n_vocab:,} tokens but the model only {cfg.vocab_size:,} "
                            "embedding rows; they do not belong together")
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    _check_shapes(cfg, state, source)
    bad = next((k for k, v in state.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ImportRefused(f"{source}: {bad} holds NaN or infinite values; a model with them samples nothing "
                            "(nothing was written)")
    return cfg, state, enc, str(source)


def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], source) -> None:
    from storyllama.model import Llama

    with torch.device("meta"):
        ref = Llama(cfg).state_dict()
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    wrong = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or extra or wrong:
        what = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra else
                f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(ref[wrong[0]].shape)}")
        raise ImportRefused(f"{source}: the weights do not fit the model its config describes ({what})")


# ---------------------------------------------------------------------------------------------
# Writing the run directory


def _files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() or p.is_symlink()}


def check_out(out: Path) -> None:
    """Refuse an --out that is not empty unless it is an earlier import nobody has added to since."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ImportRefused(f"--out {out} exists and is not a directory; choose a new path (nothing was changed)")
    if not any(out.iterdir()):
        return
    try:
        ours = set(_read_json(out / MARKER)["files"]) | {MARKER}
    except (ImportRefused, KeyError, TypeError):
        raise ImportRefused(f"--out {out} is not empty and was not written by bin/import; choose a new path "
                            "(nothing was changed)") from None
    if _files_under(out) != ours:
        raise ImportRefused(f"--out {out} is an earlier import that has changed since (e.g. trained on); it is not "
                            "replaced: choose a new path (nothing was changed)")


def write_run(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], enc, source: str) -> Path:
    from safetensors.torch import save_file

    from storyllama import checkpoint
    from storyllama.data_prep.tokenizer import write_hf_tokenizer
    from storyllama.model import Llama
    from storyllama.staging import Staging

    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with Staging(out, tool="import") as tmp:
        run = tmp / "run"
        ckpt = run / "checkpoints" / "step_000000"
        ckpt.mkdir(parents=True)
        save_file(state, str(ckpt / checkpoint.WEIGHTS))
        (ckpt / checkpoint.MODEL_CONFIG).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        tok_entry = write_hf_tokenizer(enc, ckpt, source=source)
        meta = {"tokenizer": tok_entry, "source": {"kind": "import", "from": source}}
        (ckpt / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        state_json = {"step": 0, "tokens_seen": 0, "world_size": 1,  # no data position: training starts fresh
                      "model_config": asdict(cfg), "tokenizer_sha256": tok_entry["sha256"],
                      "imported_from": source}
        (ckpt / checkpoint.STATE).write_text(json.dumps(state_json, indent=2) + "\n")
        # A fresh AdamW (no moments yet) over the model's parameter groups, so --resume auto finds one. Built on
        # the meta device: the groups' layout is all it holds.
        with torch.device("meta"):
            model = Llama(cfg)
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95))
        torch.save(opt.state_dict(), ckpt / checkpoint.OPTIMIZER)
        checkpoint.write_checksums(ckpt)
        for f in ("meta.json", tok_entry["file"]):
            shutil.copy2(ckpt / f, run / f)
        (run / "checkpoints" / "latest").write_text("step_000000\n")
        files = sorted(_files_under(run))
        (run / MARKER).write_text(json.dumps({"tool": "storyllama import", "source": source, "files": files},
                                             indent=2) + "\n")
        for f in run.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        check_out(out)  # again: nothing appeared there meanwhile
        if out.exists():
            shutil.rmtree(out)  # an empty directory or an untouched earlier import (checked just above)
        run.rename(out)
    return out


def import_model(source: str | Path, out: str | Path, tokenizer_model: str | Path | None = None) -> Path:
    """Import `source` (transformers dir, hub id or llama2.c .pt) into the run directory `out`; returns `out`.

    Raises ImportRefused (a ValueError, one sentence) for what cannot be imported or written; nothing is written
    then."""
    out = Path(out)
    check_out(out)
    cfg, state, enc, where = read_source(source, tokenizer_model)
    return write_run(out, cfg, state, enc, where)


def init_weights_from(model: torch.nn.Module, path: str | Path, data_meta: dict | None = None) -> Path:
    """Load a run's latest (or a checkpoint's) weights into `model` for fine-tuning; returns the checkpoint.

    The checkpoint's model shape must equal `model.cfg` (dropout rates aside), and, with `data_meta` (the data's
    meta.json), its tokenizer must be the data's (same name and sha256). Optimizer, step and data position are
    not taken: fine-tuning starts fresh. Errors are ValueErrors naming what differs."""
    from storyllama import checkpoint

    ckpt = checkpoint.resolve(path)
    theirs = asdict(checkpoint.load_model_config(ckpt))
    mine = asdict(model.cfg)
    diff = [f"{k}: checkpoint {theirs.get(k)}, model {v}" for k, v in mine.items()
            if k not in DROPOUT_RATES and theirs.get(k) != v]
    if diff:
        raise ValueError(f"--init_from {ckpt}: its model differs from this one ({'; '.join(diff)}); drop the model "
                         "flags to take its shape")
    if data_meta is not None:
        try:
            tok = json.loads((ckpt / "meta.json").read_text())["tokenizer"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"--init_from {ckpt} has no readable meta.json ({e}); its tokenizer cannot be checked "
                             "against the data's") from None
        data_tok = data_meta["tokenizer"]
        if (tok.get("name"), tok.get("sha256")) != (data_tok.get("name"), data_tok.get("sha256")):
            raise ValueError(f"--init_from {ckpt}: its tokenizer ({tok.get('name')}, sha256 "
                             f"{str(tok.get('sha256'))[:12]}) is not the data's ({data_tok.get('name')}, "
                             f"{str(data_tok.get('sha256'))[:12]}); prepare the data with --tokenizer hf:{path} "
                             "(or the tokenizer it was trained with)")
    checkpoint.load_weights(model, ckpt)
    return ckpt


def main(argv: list[str] | None = None, prog: str = "import") -> int:
    p = OneLineErrorParser(prog=prog, description="Import a pretrained Llama (transformers directory, hub id, or "
                           "llama2.c .pt + tokenizer.model) as a StoryLlama run directory.")
    p.add_argument("source", help="a transformers Llama directory, a hub id (owner/name) or a llama2.c .pt file")
    p.add_argument("--out", required=True, help="the run directory to create")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="llama2.c only: its SentencePiece "
                   "tokenizer.model (default: tokenizer.model beside the .pt)")
    ns = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = import_model(ns.source, ns.out, ns.tokenizer)
    except (ValueError, OSError) as e:  # ImportRefused, LockedError, CheckpointError; disk errors
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    cfg = json.loads((out / "checkpoints" / "step_000000" / "model_config.json").read_text())
    print(f"imported {ns.source} into {out} in {time.perf_counter() - t0:.1f} s: dim {cfg['dim']}, {cfg['n_layers']} "
          f"layers, vocab {cfg['vocab_size']}; sample with: bin/sample --run {out} --prompt 'Once upon a time'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
