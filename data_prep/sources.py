"""Where the stories come from: local files, the Hugging Face hub, or the built-in story writer.

A source is a re-iterable stream of documents (one story each, surrounding whitespace stripped,
empty ones skipped), read again on each pass instead of being held in memory, so the whole of
TinyStories (about 2 GB of text) streams through. `describe()` says what it is (for meta.json and
for comparing a re-run with a finished output).

Local formats, chosen by the file name's ending:
- `.txt`: stories separated by lines holding only `<|endoftext|>` (TinyStories' own downloads);
- `.jsonl` (or a `.json` file of JSON lines): one object per line with a `text` field;
- `.json`: a JSON array of such objects;
- `.parquet`: a table with a `text` column (read by pyarrow, a dependency of `datasets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from storyllama.inputs import InputError, parse_json, read_json

EOT_LINE = "<|endoftext|>"
FORMATS = (".txt", ".jsonl", ".json", ".parquet")
HF_VALIDATION_SPLITS = ("validation", "valid", "val", "test")


class SourceError(ValueError):
    """A source that cannot be read: a missing file, an unknown format, no documents."""


class Source:
    """A named stream of documents: `documents()` starts a fresh pass each call."""

    def __init__(self, documents: Callable[[], Iterator[str]], description: dict, size_bytes: int | None = None):
        self._documents = documents
        self.description = description
        self.size_bytes = size_bytes  # for the progress bar when known (file sizes), else None

    def documents(self) -> Iterator[str]:
        return self._documents()

    def describe(self) -> dict:
        return self.description

    def check_not_empty(self, what: str) -> None:
        """Raise SourceError unless the stream holds at least one document (reads only up to it)."""
        if next(iter(self.documents()), None) is None:
            raise SourceError(f"{what} holds no documents; give a file with at least one non-empty story")


def _clean(texts) -> Iterator[str]:
    for text in texts:
        if text is None:
            continue
        text = text.strip()
        if text:
            yield text


# ---------------------------------------------------------------------------------------------
# Local files


def text_named(path: Path, items: Iterator, error: type[Exception]) -> Iterator:
    """`items` read from `path`, with a decoding error turned into `error` naming the file and the byte."""
    try:
        yield from items
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (a {e.reason} near byte {e.start:,} of a chunk); save it as UTF-8, "
                    "or leave it out") from None


def _read_txt(path: Path) -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding="utf-8", newline="") as f:  # keep "\r\n" inside stories as written
        for line in f:
            if line.rstrip() == EOT_LINE:
                yield "".join(lines)
                lines = []
            else:
                lines.append(line)
    yield "".join(lines)


def _text_of(obj, path: Path, where: str) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    raise SourceError(f"{path} {where} has no string 'text' field; each record must look like "
                      '{"text": "Once upon a time..."}')


def json_lines(path: Path, error: type[Exception], hint: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed object) of each non-blank line of a JSON-lines file; a line that is not JSON
    raises `error` naming the file and line (and `hint`)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = parse_json(line, f"{path} line {lineno}")
            except InputError as e:
                raise error(f"{e}{hint}") from None
            yield lineno, obj


def _read_jsonl(path: Path) -> Iterator[str]:
    for lineno, obj in json_lines(path, SourceError, '; a .jsonl file holds one {"text": ...} object per line'):
        yield _text_of(obj, path, f"line {lineno}")


def _read_json(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):  # JSON lines under a .json name
        yield from _read_jsonl(path)
        return
    try:
        records = read_json(path, list, max_bytes=1 << 40)
    except InputError as e:
        raise SourceError(str(e)) from None
    for i, obj in enumerate(records):
        yield _text_of(obj, path, f"record {i}")


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for non-parquet files
        raise SourceError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    if "text" not in pf.schema_arrow.names:
        raise SourceError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        yield from batch.column(0).to_pylist()


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _check_file(path: Path, flag: str) -> Path:
    if path.is_dir():
        raise SourceError(f"{flag} {path} is a directory; give the files in it (e.g. {flag} {path}/*.jsonl)")
    if not path.is_file():
        raise SourceError(f"{flag} {path}: no such file; check the path")
    if path.suffix.lower() not in _READERS:
        raise SourceError(f"{flag} {path}: unknown format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    return path


def file_source(paths: Sequence[str | Path], flag: str = "--train") -> Source:
    """Documents of local files, in the order given. Each file must exist and hold a document."""
    if not paths:
        raise SourceError(f"{flag} needs at least one file")
    files = [_check_file(Path(p), flag) for p in paths]
    described = [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in files]

    def documents() -> Iterator[str]:
        for p in files:
            yield from _clean(text_named(p, _READERS[p.suffix.lower()](p), SourceError))

    for p in files:
        Source(lambda p=p: _clean(text_named(p, _READERS[p.suffix.lower()](p), SourceError)), {}) \
            .check_not_empty(f"{flag} {p}")
    return Source(documents, {"kind": "files", "files": described}, sum(d["bytes"] for d in described))


# ---------------------------------------------------------------------------------------------
# The Hugging Face hub


def hf_sources(name: str) -> tuple[Source, Source]:
    """The train and validation splits of a hub dataset with a `text` column, via datasets.load_dataset."""
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # offline, unknown name, ...: say what to do instead
        raise SourceError(f"--dataset {name}: datasets.load_dataset failed ({type(e).__name__}: {e}); offline, "
                          "download the files and pass --train FILE --val FILE") from None
    if "train" not in dd:
        raise SourceError(f"--dataset {name} has no 'train' split (splits: {', '.join(dd)})")
    val_split = next((s for s in HF_VALIDATION_SPLITS if s in dd), None)
    if val_split is None:
        raise SourceError(f"--dataset {name} has no validation split (splits: {', '.join(dd)}); download it "
                          "and pass --train FILE with --val_fraction")

    def split_source(split: str) -> Source:
        ds = dd[split]
        if "text" not in ds.column_names:
            raise SourceError(f"--dataset {name} split {split} has no 'text' column "
                              f"(columns: {', '.join(ds.column_names)})")

        def documents() -> Iterator[str]:
            for batch in ds.iter(batch_size=4096):
                yield from _clean(batch["text"])

        return Source(documents, {"kind": "huggingface", "dataset": name, "split": split,
                                  "rows": ds.num_rows})

    return split_source("train"), split_source(val_split)


# ---------------------------------------------------------------------------------------------
# In memory (the built-in writer) and the held-out fraction of a single source


def list_source(docs: Sequence[str], description: dict) -> Source:
    return Source(lambda: _clean(docs), description, sum(len(d) for d in docs))


def split_off(source: Source, val_fraction: float, seed: int) -> tuple[Source, Source]:
    """Split one source into (train, val): a seeded random `val_fraction` of its documents go to val.

    Counts the documents in one pass, draws exactly round(n * val_fraction) of them (at least one,
    never all) with numpy's generator seeded by `seed`, and routes each document on later passes by
    its index, so both halves stream and keep the source's order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise SourceError(f"--val_fraction {val_fraction} must be between 0 and 1 (e.g. 0.05)")
    n = sum(1 for _ in source.documents())
    if n < 2:
        raise SourceError(f"the source holds {n} document(s); splitting off a validation set needs at least 2, "
                          "or pass --val FILE")
    k = min(max(1, round(n * val_fraction)), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True

    def part(want_val: bool) -> Callable[[], Iterator[str]]:
        return lambda: (d for i, d in enumerate(source.documents()) if is_val[i] == want_val)

    base = source.describe()
    train_bytes = None if source.size_bytes is None else round(source.size_bytes * (1 - k / n))
    val_bytes = None if source.size_bytes is None else round(source.size_bytes * k / n)
    return Source(part(False), base, train_bytes), Source(part(True), base, val_bytes)
