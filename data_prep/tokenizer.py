"""Tokenizers, all run through tiktoken: GPT-2's ranks, or a byte-level BPE trained on the corpus.

A tokenizer here is a tiktoken "mergeable ranks" table (token bytes -> rank, ranks dense from 0)
plus the split pattern and one special token, `<|endoftext|>`, whose id is the number of ranks. So a
vocabulary of N means N - 1 ranks + EOT, and every id fits the shards' uint16 when N <= 65,536.

- `gpt2`: the ranks come from tiktoken (its download cache) or, offline, from `--tokenizer_file`.
- `bpe:N`: Hugging Face `tokenizers` trains a byte-level BPE (GPT-2 split pattern, all 256 bytes in
  the alphabet) with N - 1 tokens; its merged tokens, in the order the trainer created them, become
  ranks 256.. after the 256 single bytes. tiktoken then encodes by those ranks (as it does for GPT-2,
  whose ranks were converted the same way).

The ranks are saved beside the shards as `tokenizer.tiktoken` (tiktoken's own file format: one
`base64(token) rank` line per token), and `load_encoding(dir)` rebuilds the encoding from that file
and `meta.json` alone, with no network.

The second kind, `hf:PATH_OR_DIR`, is a Hugging Face `tokenizer.json` (e.g. an imported Llama's 32,000
tokens with byte fallback): meta.json then says `"kind": "hf"` and names `tokenizer.json`, and
`load_encoding` returns a `storyllama.data_prep.hf_tokenizer.HFEncoding`, which answers the same names
(`encode_ordinary`, `encode`, `decode`, `decode_single_token_bytes`, `eot_token`, `n_vocab`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from .hf_tokenizer import HF_TOKENIZER_FILE, HFTokenizerError, byte_level_chars, find_tokenizer_json, load_hf_encoding

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.tiktoken"
MAX_VOCAB = 65_536  # uint16 shards hold ids 0..65,535
# sha256 of GPT-2's ranks in tiktoken's file format (sorted by rank, one "base64 rank" line each), as the
# file tiktoken publishes; a ranks file whose content hashes otherwise is not GPT-2's.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
HF_PREFIX = "hf:"
GPT2_RANKS = 50_256  # GPT-2 has 50,256 byte-pair ranks; <|endoftext|> is 50,256, so the vocabulary is 50,257
# GPT-2's pre-tokenization pattern (contractions, letters, numbers, other symbols, whitespace runs),
# as tiktoken writes it; the trained BPE uses it too.
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(ValueError):
    """A tokenizer that cannot be named, loaded, trained or matched with its data directory."""


def parse_tokenizer_name(name: str) -> tuple[str, int | None]:
    """`"gpt2"` -> ("gpt2", None); `"bpe:4096"` -> ("bpe", 4096). Anything else is an error."""
    if name == "gpt2":
        return "gpt2", None
    m = re.fullmatch(r"bpe:(\d+)", name)
    if not m:
        raise TokenizerError(f"--tokenizer {name!r} is not known: use 'gpt2' or 'bpe:N' (e.g. bpe:4096)")
    vocab = int(m.group(1))
    if vocab < 257:
        raise TokenizerError(f"--tokenizer {name}: a byte-level BPE needs a vocabulary of at least 257 "
                             "(256 bytes + <|endoftext|>); choose e.g. bpe:4096")
    if vocab > MAX_VOCAB:
        raise TokenizerError(f"--tokenizer {name}: vocabulary {vocab:,} exceeds {MAX_VOCAB:,}, the most uint16 "
                             f"token shards hold; choose bpe:N with N <= {MAX_VOCAB}")
    return "bpe", vocab


# ---------------------------------------------------------------------------------------------
# The ranks file


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `.tiktoken` ranks file and check it: ranks dense from 0, all 256 single bytes present."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; pass the path of a .tiktoken ranks file")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise TokenizerError(f"{path} line {lineno} is not 'base64-token rank': {line[:80]!r}; "
                                     "pass a tiktoken ranks file (e.g. gpt2.tiktoken)") from None
    check_ranks(ranks, str(path))
    return ranks


def check_ranks(ranks: dict[bytes, int], where: str) -> None:
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{where}: ranks are not unique and dense from 0 ({len(ranks)} tokens); "
                             "the file is corrupt or not a tiktoken ranks file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{where}: {len(missing)} single bytes have no rank (e.g. {missing[0]}), so some "
                             "text could not be encoded; use a byte-level ranks file")
    if len(ranks) + 1 > MAX_VOCAB:
        raise TokenizerError(f"{where}: {len(ranks):,} ranks + <|endoftext|> exceed {MAX_VOCAB:,}, the most "
                             "uint16 token shards hold; use a smaller vocabulary")


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    """sha256 of `ranks` written in tiktoken's file format (what `dump_ranks` writes), whatever file they came from."""
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return h.hexdigest()


def dump_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ranks in tiktoken's file format, sorted by rank, atomically (temporary name, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Building encodings


def make_encoding(name: str, ranks: dict[bytes, int], pat_str: str = GPT2_PAT_STR) -> tiktoken.Encoding:
    """A tiktoken encoding over `ranks` with `<|endoftext|>` = len(ranks) as its only special token."""
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)


def gpt2_ranks(tokenizer_file: str | Path | None = None) -> dict[bytes, int]:
    """GPT-2's ranks from `tokenizer_file` (offline) or through tiktoken's own download/cache."""
    if tokenizer_file is not None:
        ranks = load_ranks(tokenizer_file)
        where = str(tokenizer_file)
    else:
        try:
            ranks = dict(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:  # network, cache or plugin failure: tell the user the offline way
            raise TokenizerError(f"tiktoken could not load the gpt2 ranks ({type(e).__name__}: {e}); offline, "
                                 "pass --tokenizer_file PATH to a gpt2.tiktoken ranks file") from None
        where = "tiktoken's gpt2"
    if len(ranks) != GPT2_RANKS:
        raise TokenizerError(f"{where} has {len(ranks):,} ranks, but GPT-2 has {GPT2_RANKS:,}: it is not the "
                             "GPT-2 ranks file; pass gpt2.tiktoken, or use --tokenizer bpe:N")
    digest = ranks_sha256(ranks)
    if digest != GPT2_RANKS_SHA256:
        # Same size, other ranks (e.g. two swapped): the ids would not be GPT-2's, so the name would lie.
        raise TokenizerError(f"{where} is not GPT-2's ranks: its ranks hash to sha256 {digest}, GPT-2's to "
                             f"{GPT2_RANKS_SHA256}; pass the real gpt2.tiktoken, or use this file as a BPE of its own "
                             f"with --tokenizer bpe:{GPT2_RANKS + 1} --tokenizer_file {where}")
    return ranks


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Train a byte-level BPE with Hugging Face `tokenizers` and return tiktoken ranks (vocab_size - 1).

    `texts` are the training documents (batches of strings are fed to the Rust trainer). The result
    is deterministic for the same texts. Raises TokenizerError when the text supports too few merges.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_ranks = vocab_size - 1  # the last id is <|endoftext|>
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT2_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)

    def batches(size: int = 1000):
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    tok.train_from_iterator(batches(), trainer)
    vocab = tok.get_vocab()  # token string (bytes as printable characters) -> id
    if len(vocab) != n_ranks:
        raise TokenizerError(f"bpe:{vocab_size}: the training text supports only {len(vocab) + 1:,} tokens "
                             f"({len(vocab) - 256:,} merges); give more text or choose a smaller bpe:N")
    chars = byte_level_chars()
    ranks = {bytes([b]): b for b in range(256)}  # single bytes first, in byte order
    for text, _id in sorted(vocab.items(), key=lambda kv: kv[1]):  # merges in the order they were learnt
        token = bytes(chars[c] for c in text)
        if len(token) > 1:
            ranks[token] = len(ranks)
    if len(ranks) != n_ranks:
        raise TokenizerError(f"bpe:{vocab_size}: the trained vocabulary does not map onto bytes one to one "
                             f"({len(ranks)} ranks for {n_ranks} tokens); this is a bug, please report it")
    check_ranks(ranks, f"bpe:{vocab_size}")
    return ranks


# ---------------------------------------------------------------------------------------------
# Reading a data (or run) directory back


def load_encoding(data_dir: str | Path):
    """The encoding of a prepared data (or run, or checkpoint) directory, from its meta.json and the tokenizer
    file it names: a tiktoken Encoding for `tokenizer.tiktoken`, an HFEncoding for `tokenizer.json`.

    Works on any directory holding those two files (the trainer copies them into its run directory).
    Checks the file's sha256 and size against meta.json, so a directory whose tokenizer does not
    belong to its shards is refused. No network.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise TokenizerError(f"{data_dir} has no meta.json: prepare it with bin/prepare_data --out {data_dir} "
                             "(or point to a run directory the trainer wrote)")
    info = tokenizer_entry(meta_path)
    name, vocab, eot, file, sha = (info[k] for k in ("name", "vocab_size", "eot_id", "file", "sha256"))
    pat = info["pat_str"] if info.get("kind", "tiktoken") == "tiktoken" else None
    path = data_dir / file
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; meta.json names it as the tokenizer of {data_dir}: copy it "
                             "back or prepare the data again")
    if file_sha256(path) != sha:
        raise TokenizerError(f"{path} does not match {meta_path} (sha256 differs): the tokenizer file belongs "
                             "to other data; restore the right file or prepare the data again")
    if info.get("kind") == "hf":
        try:
            enc = load_hf_encoding(path, eot_id=eot, name=name)
        except HFTokenizerError as e:
            raise TokenizerError(str(e)) from None
        if enc.n_vocab != vocab:
            raise TokenizerError(f"{path} has {enc.n_vocab:,} tokens, but {meta_path} says vocab_size {vocab:,}; "
                                 "prepare the data again")
        return enc
    ranks = load_ranks(path)
    if len(ranks) + 1 != vocab or eot != len(ranks):
        raise TokenizerError(f"{path} has {len(ranks):,} ranks, but {meta_path} says vocab_size {vocab:,} and "
                             f"eot_id {eot:,}; prepare the data again")
    return make_encoding(name, ranks, pat)


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (the `hf:PATH_OR_DIR` kind)


def tokenizer_entry(meta_path: Path) -> dict:
    """meta.json's "tokenizer" entry, every field the readers use checked for type and range (the file a plain
    name beside meta.json), or TokenizerError naming the file and the field."""
    from storyllama.inputs import InputError, Whole, field, read_json

    try:
        info = field(read_json(meta_path), "tokenizer", meta_path, dict)
        for key in ("name", "file", "sha256"):
            field(info, key, f"{meta_path}: tokenizer", str)
        kind = field(info, "kind", f"{meta_path}: tokenizer", str, required=False, default="tiktoken")
        if kind == "tiktoken":
            field(info, "pat_str", f"{meta_path}: tokenizer", str)
        Whole(1, 65_536).check(info.get("vocab_size"), f"{meta_path}: tokenizer 'vocab_size'")
        Whole(0, 65_535).check(info.get("eot_id"), f"{meta_path}: tokenizer 'eot_id'")
        if info["file"] != Path(info["file"]).name or info["file"] in ("", ".", ".."):
            raise InputError(f"{meta_path}: tokenizer 'file' must be a file name beside it, got {info['file'][:40]!r}")
    except InputError as e:
        raise TokenizerError(f"{e}; prepare the data again (or copy meta.json back from the data directory)") \
            from None
    return info


def is_hf_spec(name: str) -> bool:
    return name.startswith(HF_PREFIX)


def load_hf_spec(name: str):
    """`hf:PATH_OR_DIR` -> HFEncoding (a tokenizer.json, or a directory or run holding one); errors are
    TokenizerErrors, a vocabulary over 65,536 among them. Beside a meta.json of ours (a run, a checkpoint, a data
    directory) the end-of-text id is the one it records (e.g. BOS for an imported llama2.c model)."""
    path = name[len(HF_PREFIX):]
    if not path:
        raise TokenizerError("--tokenizer hf: needs a path: hf:PATH_TO/tokenizer.json or hf:MODEL_OR_RUN_DIR")
    try:
        found = find_tokenizer_json(path)
        try:
            ours = json.loads((found.parent / "meta.json").read_text())["tokenizer"]
        except (OSError, ValueError, KeyError, TypeError):
            ours = None
        if isinstance(ours, dict) and ours.get("kind") == "hf" and ours.get("file") == found.name:
            return load_encoding(found.parent)
        return load_hf_encoding(found)
    except HFTokenizerError as e:
        raise TokenizerError(f"--tokenizer {name}: {e}") from None


def write_hf_tokenizer(enc, out_dir: str | Path, source: str | None = None) -> dict:
    """Write `enc`'s tokenizer.json into `out_dir` (atomically) and return meta.json's "tokenizer" entry.

    The name is "hf" whatever path it came from, and the sha256 is of the file written, so data prepared
    with `hf:RUN_DIR` matches the run's own tokenizer (the trainer compares name and sha256)."""
    out_dir = Path(out_dir)
    path = out_dir / HF_TOKENIZER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(enc.tokenizer.to_str(pretty=False))
    os.replace(tmp, path)
    eot_text = enc.decode_single_token_bytes(enc.eot_token).decode("utf-8", errors="replace")
    entry = {"name": "hf", "kind": "hf", "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
             "file": HF_TOKENIZER_FILE, "sha256": file_sha256(path), "special": eot_text}
    if source is not None:
        entry["source"] = source
    return entry
