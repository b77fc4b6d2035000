"""Story requests: request/story pairs, the one text template they are rendered in, and their readers.

A request asks for a story by words it must use, features it must have and, optionally, a summary (the
fields of TinyStoriesInstruct). It is rendered in one fixed template, used alike by bin/prepare_data (for
training) and by bin/sample and bin/serve (as the prompt):

    Words: kite, rain, happy
    Features: Dialogue, BadEnding
    Summary: A girl loses her kite in the rain.
    Random sentence: The wind was cold.
    Request: a story about a brave frog
    Story:
    <the story>

Fields in that order, each line only when the field is given; `Story:` and a newline always end it. Words
are lowercased and joined by ", "; features take their canonical names (FEATURES: TinyStoriesInstruct's
own, plus HappyEnding), in FEATURES order; `Request:` holds a free-text request (JSONL `request`).

The loss mask. Training counts the loss on the story only: the request tokens are context, not targets.
A pair is tokenized as encode(request text) + encode(story) + [EOT], the two parts encoded apart, so the
prompt the sampler builds (encode(request text)) is exactly the tokens the model was trained on, and the
boundary is exact whatever the tokenizer merges across it. The mask is *stored beside the tokens*: for
each token shard `{split}_NNNNNN.bin` a mask shard `{split}_NNNNNN.mask` (the same 64-byte header with its
own magic, then one uint8 per token: 1 = the token is a story token or the EOT that closes the story, i.e.
a loss target; 0 = a request token), written the same crash-safe way (a `.tmp` name, fsync, rename) and
listed with its count in meta.json, which is written last. Why not a reserved boundary token from which
the mask could be derived: our tokenizers have one special token (EOT), and the tiny presets' vocabulary
(2,048 ranks, padded to 2,048) has no spare id, so a new token would change the tokenizer, its sha256 and
the model's vocabulary, and `--init_from` a pretrained run (which checks the tokenizer is the data's)
would no longer apply; the plain-text template also lets a model never trained on requests be prompted
with the very same text (the baseline of the score). The cost is one byte per token on disk.

Readers (each yields (Request, story) pairs):
- TinyStoriesInstruct's text format (`.txt`, or the hub's `roneneldan/TinyStoriesInstruct`, whose rows are
  that file's lines): blocks separated by `<|endoftext|>` lines; in a block, lines `Features: ...`,
  `Words: ...`, `Summary: ...`, `Random sentence: ...` (any order, any subset), then a line `Story:` after
  which the rest of the block is the story. A block without a `Story:` line, or with an empty story, is an
  error naming the file and the block's line number.
- JSONL: one object per line with a `story` field and a request: a free-text `request`, and/or `words`
  (a list or a comma-separated string), `features`, `summary`, `random_sentence`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storyllama.inputs import InputError
from storyllama.inputs import field as input_field

from .encode import map_in_order
from .sources import json_lines

EOT_LINE = "<|endoftext|>"
STORY_HEAD = "Story:"
# Canonical feature names, in the order the template writes them. TinyStoriesInstruct uses all but
# HappyEnding (which the built-in writer and the sampler add).
FEATURES = ("Dialogue", "HappyEnding", "BadEnding", "MoralValue", "Twist", "Foreshadowing", "Conflict")
_FEATURE_KEY = {re.sub(r"[^a-z]", "", f.lower()): f for f in FEATURES}
_FEATURE_KEY.update({"moral": "MoralValue", "happy": "HappyEnding", "sad": "BadEnding", "sadending": "BadEnding"})
# Field lines of the text format -> Request attribute.
_FIELDS = {"Words": "words", "Features": "features", "Summary": "summary", "Random sentence": "random_sentence",
           "Request": "request"}


class InstructError(ValueError):
    """A request/story source that cannot be read; the message names the file and line."""


def feature_name(name: str) -> str:
    """'happy_ending', 'HappyEnding', 'happy ending', 'moral' -> the canonical name; unknown names are errors."""
    key = re.sub(r"[^a-z]", "", name.lower())
    if key not in _FEATURE_KEY:
        raise InstructError(f"unknown story feature {name!r}; use one of "
                            + ", ".join(re.sub(r"(?<!^)(?=[A-Z])", "_", f).lower() for f in FEATURES))
    return _FEATURE_KEY[key]


def split_list(value) -> list[str]:
    """A list, or a comma-separated string, -> stripped non-empty items."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


@dataclass(frozen=True)
class Request:
    words: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    summary: str = ""
    random_sentence: str = ""
    request: str = ""  # free text

    @classmethod
    def make(cls, words=None, features=None, summary: str | None = "", random_sentence: str | None = "",
             request: str | None = "", strict: bool = True) -> Request:
        """Normalised: words lowercased, features canonical and in FEATURES order, duplicates dropped.

        strict: an unknown feature is an error (the sampler); otherwise (reading a data set) it is kept as
        written, after the known ones."""
        w = tuple(dict.fromkeys(x.lower() for x in split_list(words)))
        known, other = set(), []
        for x in split_list(features):
            try:
                known.add(feature_name(x))
            except InstructError:
                if strict:
                    raise
                other.append(x)
        feats = tuple(x for x in FEATURES if x in known) + tuple(dict.fromkeys(other))
        one = lambda s: " ".join(str(s or "").split())  # one line: the template is line-based  # noqa: E731
        return cls(w, feats, one(summary), one(random_sentence), one(request))

    def is_empty(self) -> bool:
        return not (self.words or self.features or self.summary or self.random_sentence or self.request)

    def text(self) -> str:
        """The prompt: the fixed template (module docstring), ending with 'Story:' and a newline."""
        lines = []
        if self.words:
            lines.append("Words: " + ", ".join(self.words))
        if self.features:
            lines.append("Features: " + ", ".join(self.features))
        for label, value in (("Summary", self.summary), ("Random sentence", self.random_sentence),
                             ("Request", self.request)):
            if value:
                lines.append(f"{label}: {value}")
        lines.append(STORY_HEAD)
        return "\n".join(lines) + "\n"


def request_ids(enc, request: Request) -> list[int]:
    """The request's tokens: the prompt of the sampler and the masked head of every training pair."""
    return enc.encode_ordinary(request.text())


def encode_pair(enc, request: Request, story: str) -> tuple[list[int], int]:
    """(tokens, number of request tokens): request tokens, then the story's, then EOT."""
    head = request_ids(enc, request)
    return head + enc.encode_ordinary(story) + [enc.eot_token], len(head)


@dataclass
class EncodedPairs:
    tokens: np.ndarray
    mask: np.ndarray  # uint8, 1 = loss target (story token or its closing EOT)
    documents: int
    bytes: int  # UTF-8 bytes of the stories only: what validation bits per byte divides by


def encode_pairs_chunk(enc, pairs: list[tuple[Request, str]], dtype: np.dtype) -> EncodedPairs:
    toks: list[int] = []
    mask: list[int] = []
    nbytes = 0
    for req, story in pairs:
        ids, n_head = encode_pair(enc, req, story)
        toks += ids
        mask += [0] * n_head + [1] * (len(ids) - n_head)
        nbytes += len(story.encode("utf-8", errors="replace"))
    return EncodedPairs(np.asarray(toks, dtype=dtype), np.asarray(mask, dtype=np.uint8), len(pairs), nbytes)


def chunk_pairs(pairs: Iterable[tuple[Request, str]], chunk_chars: int = 1 << 20) -> Iterator[list]:
    chunk, size = [], 0
    for pair in pairs:
        chunk.append(pair)
        size += len(pair[1])
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# -- readers -------------------------------------------------------------------------------------------
def _field_line(line: str) -> tuple[str, str] | None:
    for label, attr in _FIELDS.items():
        if line.startswith(label + ":"):
            return attr, line[len(label) + 1 :].strip()
    return None


def parse_instruct_lines(lines: Iterable[str], name: str) -> Iterator[tuple[Request, str]]:
    """TinyStoriesInstruct's text format (module docstring) from `lines` (with or without newlines).

    Errors name `name` and the 1-based line number of the offending block's first line."""
    block: list[str] = []
    start = 1
    lineno = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if line.strip() == EOT_LINE:
            pair = _parse_block(block, name, start)
            if pair is not None:
                yield pair
            block, start = [], lineno + 1
        else:
            block.append(line)
    pair = _parse_block(block, name, start)
    if pair is not None:
        yield pair


def _parse_block(block: list[str], name: str, start: int) -> tuple[Request, str] | None:
    if not any(line.strip() for line in block):
        return None  # blank space between separators (e.g. after the last one)
    fields: dict[str, str] = {}
    last = None
    for i, line in enumerate(block):
        if line.startswith(STORY_HEAD):
            story = "\n".join([line[len(STORY_HEAD):], *block[i + 1 :]]).strip()
            if not story:
                raise InstructError(f"{name} line {start + i}: the block starting at line {start} has an empty "
                                    "story after 'Story:'; every request needs its story")
            try:
                req = Request.make(fields.get("words"), fields.get("features"), fields.get("summary"),
                                   fields.get("random_sentence"), fields.get("request"), strict=False)
            except InstructError as e:
                raise InstructError(f"{name} line {start}: {e}") from None
            return req, story
        parsed = _field_line(line)
        if parsed is not None:
            last = parsed[0]
            fields[last] = parsed[1]
        elif line.strip() and last is not None:  # a field that runs over more than one line
            fields[last] += " " + line.strip()
        elif line.strip():
            raise InstructError(f"{name} line {start + i}: {line[:60]!r} is neither a request field (Words:, "
                                "Features:, Summary:, Random sentence:) nor 'Story:'")
    raise InstructError(f"{name} line {start}: the block starting here has no 'Story:' line (a request without "
                        "a story); each block between <|endoftext|> lines needs one")


def _read_txt(path: Path) -> Iterator[tuple[Request, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from parse_instruct_lines(f, str(path))


def pair_from_record(obj, where: str) -> tuple[Request, str]:
    if not isinstance(obj, dict) or not isinstance(obj.get("story"), str) or not obj["story"].strip():
        raise InstructError(f"{where} has no non-empty string 'story' field; each record must look like "
                            '{"request": "...", "story": "..."} or {"words": [...], "features": [...], "story": ...}')
    try:
        for key in ("words", "features"):  # a list of strings, or one comma-separated string
            value = obj.get(key)
            if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                     and all(isinstance(x, str) for x in value))):
                raise InstructError(f"{key!r} must be a list of strings or a comma-separated string, got "
                                    f"{type(value).__name__} {str(value)[:40]}")
        for key in ("summary", "random_sentence", "request"):
            input_field(obj, key, "the record", str, required=False)
        req = Request.make(obj.get("words"), obj.get("features"), obj.get("summary"), obj.get("random_sentence"),
                           obj.get("request"), strict=False)
    except (InstructError, InputError) as e:
        raise InstructError(f"{where}: {e}") from None
    if req.is_empty():
        raise InstructError(f"{where} has a story but no request (request, words, features or summary)")
    return req, obj["story"].strip()


def _read_jsonl(path: Path) -> Iterator[tuple[Request, str]]:
    for lineno, obj in json_lines(path, InstructError):
        yield pair_from_record(obj, f"{path} line {lineno}")


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_jsonl}


def read_pairs(path: str | Path) -> Iterator[tuple[Request, str]]:
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise InstructError(f"{path}: request/story pairs are read from {', '.join(READERS)} files, not "
                            f"{path.suffix!r}")
    from .sources import text_named

    return text_named(path, reader(path), InstructError)


def encode_pairs(enc, pairs: Iterable[tuple[Request, str]], dtype: np.dtype, num_proc: int) -> Iterator[EncodedPairs]:
    """Encode pairs chunk by chunk on `num_proc` threads, yielding chunks in input order (at most 2 * num_proc
    in flight), so the output is the same for any number of workers."""
    return map_in_order(lambda chunk: encode_pairs_chunk(enc, chunk, dtype), chunk_pairs(pairs), num_proc)


# -- sources of pairs (the same Source objects as data_prep.sources, holding pairs instead of texts) ------
def file_pair_source(paths, flag: str = "--train"):
    """Pairs of local .txt (TinyStoriesInstruct format) and .jsonl files, in the order given."""
    from .sources import Source, SourceError

    if not paths:
        raise SourceError(f"{flag} needs at least one file")
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            raise SourceError(f"{flag} {p} is a directory; give the files in it")
        if not p.is_file():
            raise SourceError(f"{flag} {p}: no such file; check the path")
        if p.suffix.lower() not in READERS:
            raise SourceError(f"{flag} {p}: request/story pairs come from {', '.join(READERS)} files "
                              f"(TinyStoriesInstruct .txt or JSONL), not {p.suffix!r}")
        files.append(p)
    described = [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files]

    def pairs() -> Iterator[tuple[Request, str]]:
        for p in files:
            yield from read_pairs(p)

    return Source(pairs, {"kind": "files", "files": described}, sum(d["bytes"] for d in described))


def hf_pair_sources(name: str):
    """(train, validation) pairs of a hub data set in TinyStoriesInstruct's text format: its `text` rows are
    the lines of the original .txt files (datasets' text builder), parsed as one stream per split."""
    import datasets

    from .sources import HF_VALIDATION_SPLITS, Source, SourceError

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name, ...
        raise SourceError(f"--dataset {name}: datasets.load_dataset failed ({type(e).__name__}: {e}); offline, "
                          "download its .txt files and pass --train FILE --val FILE --instruct") from None
    val_split = next((s for s in HF_VALIDATION_SPLITS if s in dd), None)
    if "train" not in dd or val_split is None:
        raise SourceError(f"--dataset {name} needs a train and a validation split (splits: {', '.join(dd)})")

    def split_source(split: str):
        ds = dd[split]
        if "text" not in ds.column_names:
            raise SourceError(f"--dataset {name} split {split} has no 'text' column")

        def lines() -> Iterator[str]:
            for batch in ds.iter(batch_size=4096):
                for row in batch["text"]:
                    yield from (row or "").split("\n")

        return Source(lambda: parse_instruct_lines(lines(), f"--dataset {name} split {split}"),
                      {"kind": "huggingface", "dataset": name, "split": split, "rows": ds.num_rows})

    return split_source("train"), split_source(val_split)
