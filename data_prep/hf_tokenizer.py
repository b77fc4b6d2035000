"""Hugging Face `tokenizers` files (tokenizer.json) behind the names our callers use from tiktoken.

`HFEncoding` wraps a `tokenizers.Tokenizer` and answers `encode_ordinary`, `encode`, `encode_to_numpy`,
`decode`, `decode_single_token_bytes`, `eot_token`, `n_vocab` and `name` as a tiktoken Encoding does:

- ids never include a BOS the tokenizer's post-processor would add (tiktoken adds nothing either);
- `decode` is the concatenation of the tokens' bytes (so prompt + decode(continuation) reads right),
  not the tokenizers library's decode, which strips the leading space of a SentencePiece-style text;
- `encode_ordinary` treats special-token text (`</s>`, `<|endoftext|>`) as plain text.

A SentencePiece-style tokenizer (Llama-2's: a "▁" prepended to every text) gives back that one space in
front: `decode(encode_ordinary(t)) == enc.dummy_prefix + t`. `decode_document` removes it.

Also here: the converters that make tokenizer.json files, from our tiktoken ranks (byte-level BPE,
GPT-2's split pattern: the same ids as tiktoken) and from a SentencePiece BPE `tokenizer.model` (llama2.c's
and Llama-2's: the same ids as sentencepiece).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

HF_TOKENIZER_FILE = "tokenizer.json"
MAX_VOCAB = 65_536


class HFTokenizerError(ValueError):
    """A tokenizer.json that cannot be loaded or used here; the message says which and why."""


def byte_level_chars() -> dict[str, int]:
    """The byte-level BPE alphabet: the printable character each byte is written as -> that byte.

    Bytes that print as themselves (visible Latin-1 characters) keep their code point; the other 68
    (controls, space, soft hyphen, ...) are given the code points 256, 257, ... in byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars: dict[str, int] = {chr(b): b for b in visible}
    extra = 256
    for b in range(256):
        if b not in visible:
            chars[chr(extra)] = b
            extra += 1
    return chars


def byte_level_encoder() -> dict[int, str]:
    """byte -> its character in byte-level BPE's alphabet (the inverse of the decoder table)."""
    return {b: c for c, b in byte_level_chars().items()}


def _component_types(node) -> set[str]:
    """Every "type" named in a tokenizer.json component (recursing into Sequence)."""
    if isinstance(node, dict):
        out = {node["type"]} if isinstance(node.get("type"), str) else set()
        for v in node.values():
            out |= _component_types(v)
        return out
    if isinstance(node, list):
        return set().union(*(_component_types(v) for v in node)) if node else set()
    return set()


class HFEncoding:
    """A tokenizer.json with tiktoken's Encoding interface (see the module docstring)."""

    def __init__(self, tokenizer, eot_id: int, name: str = "hf", where: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        self.name = name
        self._tok = tokenizer
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True  # special-token text in a story is plain text
        vocab = tokenizer.get_vocab(with_added_tokens=True)  # token string -> id
        self.n_vocab = max(vocab.values()) + 1
        if self.n_vocab > MAX_VOCAB:
            raise HFTokenizerError(f"{where} has a vocabulary of {self.n_vocab:,} tokens, more than the {MAX_VOCAB:,} "
                                   "that uint16 token shards hold; this tokenizer cannot be used here")
        if not 0 <= eot_id < self.n_vocab:
            raise HFTokenizerError(f"{where}: end-of-text id {eot_id} is outside its vocabulary of {self.n_vocab:,}")
        self.eot_token = eot_id
        added = tokenizer.get_added_tokens_decoder()  # id -> AddedToken
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        self._bytes = self._token_bytes(vocab, added)
        probe = b"".join(self._bytes[i] for i in self.encode_ordinary("a"))
        self.dummy_prefix = " " if probe == b" a" else ""

    # -- the tiktoken names ------------------------------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, allowed_special="none", disallowed_special="all") -> list[int]:
        return self.encode_to_numpy(text, allowed_special, disallowed_special).tolist()

    def encode_to_numpy(self, text: str, allowed_special="none", disallowed_special="all") -> np.ndarray:
        """Special tokens in `allowed_special` ("all" or a set of strings) become their ids; the text between
        them is encoded piece by piece (as each piece alone). A disallowed one in the text is an error."""
        specials = set(self.special_tokens)
        allowed = specials if allowed_special == "all" else set(allowed_special or ()) & specials
        disallowed = specials - allowed if disallowed_special == "all" else set(disallowed_special or ())
        for s in disallowed:
            if s in text:
                raise ValueError(f"the text contains the special token {s!r}; pass allowed_special to encode it "
                                 "as that token, or encode_ordinary to encode it as plain text")
        if not allowed:
            return np.asarray(self.encode_ordinary(text), dtype=np.uint32)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
        parts = re.split(pattern, text)  # text, special, text, special, ..., text
        pieces = parts[0::2]
        encoded = self._plain.encode_batch(pieces, add_special_tokens=False) if len(pieces) > 1 else \
            [self._plain.encode(pieces[0], add_special_tokens=False)]
        out: list[int] = []
        for k, enc in enumerate(encoded):
            if pieces[k]:
                out.extend(enc.ids)
            if 2 * k + 1 < len(parts):
                out.append(self.special_tokens[parts[2 * k + 1]])
        return np.asarray(out, dtype=np.uint32)

    def decode(self, ids) -> str:
        return b"".join(self._bytes[int(i)] for i in ids).decode("utf-8", errors="replace")

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._bytes[int(token)]

    def decode_document(self, ids) -> str:
        """The text of a whole document: `decode` without the dummy prefix space a SentencePiece tokenizer adds."""
        text = self.decode(ids)
        return text[len(self.dummy_prefix):] if self.dummy_prefix and text.startswith(self.dummy_prefix) else text

    @property
    def tokenizer(self):
        """The underlying `tokenizers.Tokenizer` (special tokens recognised)."""
        return self._tok

    # -- token bytes ---------------------------------------------------------------------------------
    def _token_bytes(self, vocab: dict[str, int], added: dict) -> list[bytes]:
        conf = json.loads(self._tok.to_str())
        decoder_types = _component_types(conf.get("decoder"))
        byte_fallback = bool((conf.get("model") or {}).get("byte_fallback"))
        table: list[bytes] = [b""] * self.n_vocab
        if "ByteLevel" in decoder_types:
            chars = byte_level_chars()
            to_bytes = lambda s: bytes(chars[c] for c in s) if all(c in chars for c in s) else s.encode()
        elif decoder_types & {"Metaspace", "Replace", "ByteFallback"}:
            def to_bytes(s: str) -> bytes:
                m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", s)
                if m and byte_fallback:
                    return bytes([int(m.group(1), 16)])
                return s.replace("\u2581", " ").encode()
        else:
            to_bytes = None  # an unusual decoder: ask the library token by token
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].content.encode()
            elif to_bytes is not None:
                table[i] = to_bytes(token)
            else:
                table[i] = self._tok.decode([i], skip_special_tokens=False).encode()
        return table


def find_tokenizer_json(path: str | Path) -> Path:
    """`path` itself when it is a file, else the tokenizer.json in that directory (or its checkpoint's)."""
    path = Path(path)
    if path.is_file():
        return path
    for cand in (path / HF_TOKENIZER_FILE, path / "checkpoints" / "latest"):
        if cand.name == "latest" and cand.is_file():
            cand = path / "checkpoints" / cand.read_text().strip() / HF_TOKENIZER_FILE
        if cand.is_file():
            return cand
    raise HFTokenizerError(f"{path} holds no {HF_TOKENIZER_FILE}: pass a tokenizer.json file, or a directory "
                           "(a transformers model, an imported run) that has one")


def eos_of(tok_json: Path) -> int | None:
    """The end-of-text id a directory declares: tokenizer_config.json's or config.json's eos, if any."""
    d = tok_json.parent
    vocab = None
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((d / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            return eos
    try:
        eos = json.loads((d / "tokenizer_config.json").read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            from tokenizers import Tokenizer

            vocab = Tokenizer.from_file(str(tok_json)).get_vocab(with_added_tokens=True)
            return vocab.get(eos)
    except (OSError, ValueError):
        pass
    return None


def load_hf_encoding(path: str | Path, eot_id: int | None = None, name: str = "hf") -> HFEncoding:
    """An HFEncoding from a tokenizer.json (or a directory holding one). The end-of-text id is `eot_id`,
    else the directory's declared eos, else a token named `<|endoftext|>`, `</s>` or `<eos>`."""
    from tokenizers import Tokenizer

    tok_json = find_tokenizer_json(path)
    try:
        tok = Tokenizer.from_file(str(tok_json))
    except Exception as e:  # tokenizers raises its own Exception type for bad files
        raise HFTokenizerError(f"{tok_json} is not a tokenizers file ({e}); pass a Hugging Face tokenizer.json") \
            from None
    if eot_id is None:
        eot_id = eos_of(tok_json)
    if eot_id is None:
        vocab = tok.get_vocab(with_added_tokens=True)
        eot_id = next((vocab[t] for t in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>") if t in vocab), None)
    if eot_id is None:
        raise HFTokenizerError(f"{tok_json}: no end-of-text token found (no eos in its directory's config, no "
                               "<|endoftext|> or </s>); documents need one")
    return HFEncoding(tok, eot_id, name=name, where=str(tok_json))


# ---------------------------------------------------------------------------------------------
# Converters


def ranks_to_tokens_and_merges(ranks: dict[bytes, int]) -> tuple[list[str], list[tuple[str, str]]]:
    """tiktoken ranks -> byte-level BPE tokens (in rank order) and merges that give tiktoken's ids.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A merge
    list holding every split (left, right) of every token, ordered by the rank of the token it makes,
    lets a classic BPE take the same steps.
    """
    enc = byte_level_encoder()
    text = lambda b: "".join(enc[x] for x in b)
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = text(token)
    merges: list[tuple[int, int, int]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                merges.append((rank, left, right))
    merges.sort()
    return tokens, [(tokens[a], tokens[b]) for _, a, b in merges]


def ranks_to_hf_tokenizer(ranks: dict[bytes, int], pat_str: str, specials: dict[str, int]):
    """A `tokenizers.Tokenizer` giving the same ids as tiktoken for `ranks` + `specials` (e.g. EOT)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = ranks_to_tokens_and_merges(ranks)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for content, i in sorted(specials.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != i:
            raise HFTokenizerError(f"special token {content!r} got id {tok.token_to_id(content)}, not {i}; its id must "
                                   "follow the ranks")
    return tok


def sentencepiece_to_hf_tokenizer(model_file: str | Path):
    """A SentencePiece BPE `tokenizer.model` (Llama-2's, llama2.c's) -> `tokenizers.Tokenizer`, same ids.

    Returns (tokenizer, bos_id, eos_id). A Unigram model or a normalisation other than identity is refused.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    model_file = Path(model_file)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise HFTokenizerError(f"{model_file} is not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 bpe
        raise HFTokenizerError(f"{model_file} is a SentencePiece model of type {proto.trainer_spec.model_type} "
                               "(not BPE); only BPE models (Llama-2's, llama2.c's) are converted")
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise HFTokenizerError(f"{model_file} normalises text with {norm.name!r}; only the identity normalisation "
                               "(Llama-2's, llama2.c's) is converted exactly")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]  # type 1 normal, 2 unknown, 3 control, 6 byte
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # SentencePiece BPE merges, at each step, the adjacent pair whose concatenation has the highest score. The
    # scores mostly fall with the id, but not always (Llama-2's whitespace runs "▁▁" score -1e9): so every split
    # of every normal piece, ordered by the score of the piece it makes (then its id), gives the same steps.
    merges: list[tuple[float, int, int, int]] = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left is not None and right is not None and pieces[left][2] == 1 and pieces[right][2] == 1:
                merges.append((-score, i, left, right))
    merges.sort()
    unk = pieces[proto.trainer_spec.unk_id][0] if proto.trainer_spec.unk_id >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(pieces[a][0], pieces[b][0]) for _, _, a, b in merges],
                               unk_token=unk, fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    steps = []
    if norm.remove_extra_whitespaces:  # SentencePiece drops leading, trailing and repeated spaces
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, kind in pieces if kind in (2, 3)])
    bos, eos = proto.trainer_spec.bos_id, proto.trainer_spec.eos_id
    return tok, (bos if bos >= 0 else None), (eos if eos >= 0 else None)
