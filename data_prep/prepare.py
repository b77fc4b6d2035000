"""The pipeline behind bin/prepare_data: text source -> tokenizer -> token shards + meta.json.

    bin/prepare_data --builtin --tokenizer bpe:4096 --out data/builtin
    bin/prepare_data --train train.jsonl --val valid.jsonl --tokenizer gpt2 --tokenizer_file gpt2.tiktoken --out DIR
    bin/prepare_data --dataset roneneldan/TinyStories --tokenizer gpt2 --out data/tinystories-gpt2
    bin/prepare_data --builtin --instruct --tokenizer bpe:2048 --tokenizer_file data/demo/tokenizer.tiktoken --out DIR
    bin/prepare_data --dataset roneneldan/TinyStoriesInstruct --instruct --tokenizer gpt2 --out DIR

With --instruct the sources hold request/story pairs (data_prep/instruct.py: the template, the readers, and
why the loss mask is stored beside the tokens); each token shard then has its mask shard, and a split's
`bytes` count the stories' text only (the loss covers the story tokens only; `target_tokens` counts them).

Steps, in an order that writes nothing until every check has passed:
1. check the options and the source files (existence, format);
2. look at the output directory: a finished output of the same command -> say so and stop; a finished
   output of another command, or a directory we did not write -> refuse;
3. take the output's lock (`storyllama.locking.DirLock`: an flock on OUT/.storyllama.lock that dies with
   the process), or refuse at once, naming the run that holds it; under the lock, look again (another
   run may have finished meanwhile, or died leaving an unfinished output of other data);
4. open the sources (split off `--val_fraction` of a single source), check each holds a document, get
   or train the tokenizer;
5. write `prepare.inprogress.json` (what is being made), `tokenizer.tiktoken`, the shards of each
   split (each to `.tmp` and renamed), and last `meta.json`, atomically; then drop the marker and
   the lock file.
A run that fails with an error, or is stopped with Ctrl-C, removes what it wrote (never what another
run made: the lock keeps other runs out while it writes, and it deletes nothing before step 5). A run
that is killed leaves the marker and perhaps some `.tmp` files and whole shards, never `meta.json`;
the next run of the same command clears them and starts again.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from storyllama.config import OneLineErrorParser
from storyllama.inputs import SEED, NumberError, Real, Whole
from storyllama.locking import LOCK_NAME, DirLock

from . import builtin, instruct, sources
from .encode import encode_documents
from .hf_tokenizer import HF_TOKENIZER_FILE
from .shards import (
    DTYPES,
    FORMAT_VERSION,
    MASK_MAGIC,
    ShardError,
    ShardWriter,
    naming_the_file,
    read_header,
    write_json_atomic,
)
from .tokenizer import (
    GPT2_PAT_STR,
    TOKENIZER_FILE,
    dump_ranks,
    file_sha256,
    gpt2_ranks,
    is_hf_spec,
    load_hf_spec,
    load_ranks,
    make_encoding,
    parse_tokenizer_name,
    train_bpe,
    write_hf_tokenizer,
)

log = logging.getLogger("data_prep")

META_FILE = "meta.json"
MARKER_FILE = "prepare.inprogress.json"
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SHARD_TOKENS = 50_000_000  # 100 MB per uint16 shard; the writer holds up to two in memory
MIN_SHARD_TOKENS = 1024  # smaller shards only make many tiny files (--shard_tokens 1: one file per token)
MAX_NUM_PROC = 1024  # tokenizer threads
DEFAULT_BUILTIN_STORIES = 6_000  # ~3.4 MB of text: a few minutes of CPU training for the demo
DEFAULT_BPE_TRAIN_MB = 200.0  # plenty for a 4k-32k vocabulary of simple stories; bounds the training time


class PrepareError(ValueError):
    """Options or an output directory that prepare_data cannot work with; the message says what to change."""


@dataclass
class PrepareOptions:
    """What to prepare. Exactly one source: `dataset`, `train` (files, optional `val`), or `builtin`."""

    out: str | Path
    tokenizer: str = "gpt2"
    tokenizer_file: str | Path | None = None
    dataset: str | None = None
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    builtin: bool = False
    builtin_stories: int = DEFAULT_BUILTIN_STORIES
    val_fraction: float | None = None  # default DEFAULT_VAL_FRACTION when a single source must be split
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    seed: int = 1337
    num_proc: int | None = None  # None: every core this process may use
    bpe_train_mb: float = DEFAULT_BPE_TRAIN_MB
    progress: bool | None = None  # tqdm bars: None = only on a terminal
    instruct: bool = False  # request/story pairs: shards with loss masks (data_prep/instruct.py)


# The ranges of the numbers above (storyllama.inputs); the flags are read through them too.
SHARD_TOKENS = Whole(MIN_SHARD_TOKENS, 2**32)
BUILTIN_STORIES = Whole(2, 10_000_000)  # 10 million built-in stories: about 2 billion tokens, 4 GB of shards
BPE_TRAIN_MB = Real(0, 100_000, low_open=True)
VAL_FRACTION = Real(0, 1, low_open=True, high_open=True)


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# What the output is: the identity compared with an existing output


def _identity(o: PrepareOptions) -> dict:
    """The source and options that define the output (num_proc does not: the output is the same)."""
    kind, _vocab = ("hf", None) if is_hf_spec(o.tokenizer) else parse_tokenizer_name(o.tokenizer)
    given = [name for name, on in (("--dataset", o.dataset), ("--train", o.train), ("--builtin", o.builtin)) if on]
    if len(given) != 1:
        raise PrepareError(f"give exactly one source: --dataset NAME, --train FILE... or --builtin "
                           f"(got {', '.join(given) or 'none'})")
    if o.val and not o.train:
        raise PrepareError("--val FILE... goes with --train FILE...; the other sources bring their own validation")
    if o.val and o.val_fraction is not None:
        raise PrepareError("give --val FILE... or --val_fraction F, not both")
    if o.dataset and o.val_fraction is not None:
        raise PrepareError(f"--dataset {o.dataset} has its own validation split; drop --val_fraction")
    splits_off = not o.dataset and not o.val
    val_fraction = (DEFAULT_VAL_FRACTION if o.val_fraction is None else o.val_fraction) if splits_off else None
    hints = {"--shard_tokens": f"shards hold at least {MIN_SHARD_TOKENS:,} tokens; the default "
                               f"{DEFAULT_SHARD_TOKENS:,} makes 100 MB shards",
             "--builtin_stories": "one of them at least goes to val",
             "--num_proc": f"tokenizer threads; this machine has {default_num_proc()} cores"}
    for flag, value, rng in (("--shard_tokens", o.shard_tokens, SHARD_TOKENS),
                             ("--builtin_stories", o.builtin_stories if o.builtin else None, BUILTIN_STORIES),
                             ("--bpe_train_mb", o.bpe_train_mb, BPE_TRAIN_MB),
                             ("--num_proc", o.num_proc, Whole(1, MAX_NUM_PROC)), ("--seed", o.seed, SEED),
                             ("--val_fraction", val_fraction, VAL_FRACTION)):
        if value is not None:
            try:
                rng.check(value, flag)
            except NumberError as e:
                raise PrepareError(f"{e}" + (f" ({hints[flag]})" if flag in hints else "")) from None

    files = instruct.file_pair_source if o.instruct else sources.file_source
    if o.dataset:
        source = {"kind": "huggingface", "dataset": o.dataset}
    elif o.builtin:
        source = {"kind": "builtin", "stories": o.builtin_stories, "seed": o.seed,
                  "generator_version": builtin.GENERATOR_VERSION}
    else:
        source = {"kind": "files", "train": files(o.train, "--train").describe()["files"],
                  "val": files(o.val, "--val").describe()["files"] if o.val else None}
    if o.instruct:  # only then, so the identity of every other output stays as it was
        source["instruct"] = True
        if o.builtin:
            source["instruct_version"] = builtin.INSTRUCT_VERSION
    tok_sha = None
    if o.tokenizer_file is not None:
        if Path(o.tokenizer_file).is_dir():
            raise PrepareError(f"--tokenizer_file {o.tokenizer_file} is a directory; give the .tiktoken file in it")
        if not Path(o.tokenizer_file).is_file():
            raise PrepareError(f"--tokenizer_file {o.tokenizer_file}: no such file; check the path")
        tok_sha = file_sha256(o.tokenizer_file)
    options = {
        "tokenizer": o.tokenizer,
        "tokenizer_file_sha256": tok_sha,
        "val_fraction": val_fraction,
        "seed": o.seed if (o.builtin or val_fraction is not None) else None,  # only where it changes the output
        "shard_tokens": o.shard_tokens,
        "bpe_train_mb": o.bpe_train_mb if kind == "bpe" and tok_sha is None else None,
    }
    return json.loads(json.dumps({"source": source, "options": options}))  # JSON-normal, comparable with meta


def _differences(old: dict, new: dict) -> str:
    diffs = []
    for part in ("source", "options"):
        a, b = old.get(part, {}), new[part]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{part}.{key}: {json.dumps(a.get(key))} there, {json.dumps(b.get(key))} now")
    return "; ".join(diffs)


def _ours(path: Path) -> bool:
    """Files prepare_data writes into an output directory."""
    n = path.name
    return (n in (META_FILE, MARKER_FILE, TOKENIZER_FILE, HF_TOKENIZER_FILE, LOCK_NAME) or n.endswith(".tmp")
            or (n.endswith((".bin", ".mask")) and n.split("_")[0] in SPLITS))


def _check_complete(out: Path, meta: dict) -> None:
    """A finished output must still hold its tokenizer and every shard whole (headers only: cheap)."""
    try:
        tok = out / meta["tokenizer"]["file"]
        if not tok.is_file() or file_sha256(tok) != meta["tokenizer"]["sha256"]:
            raise ShardError(f"{tok} is missing or is not the tokenizer meta.json names")
        for split in SPLITS:
            info = meta["splits"][split]
            counts = [read_header(out / name)[1] for name in info["shards"]]
            if sum(counts) != info["tokens"]:
                raise ShardError(f"the {split} shards hold {sum(counts):,} tokens, meta.json says {info['tokens']:,}")
            for name, count in zip(info["masks"], counts, strict=True) if "masks" in info else ():
                if read_header(out / name, MASK_MAGIC)[1] != count:
                    raise ShardError(f"{out / name} does not hold one entry per token of its shard")
    except (ShardError, KeyError, TypeError) as e:
        raise PrepareError(f"{out} looks finished but is damaged ({e}); delete {out} and run the same command "
                           "again") from None


def _check_output(out: Path, identity: dict, locked: bool) -> dict | None:
    """Return the finished meta when `out` already holds this output; raise when it holds something else.

    Without the lock (`locked` False) an unfinished output may be another run's, still going: it is left
    for the lock to decide. Under the lock it is a dead run's, of this command (cleared) or not (refused)."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a directory; choose another --out")
    meta_path, marker_path = out / META_FILE, out / MARKER_FILE
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            raise PrepareError(f"{meta_path} is not valid JSON; delete {out} or choose another --out") from None
        diff = _differences(meta, identity)
        if diff:
            raise PrepareError(f"{out} already holds data prepared differently ({diff}); choose another --out, "
                               f"or delete {out} to replace it")
        _check_complete(out, meta)
        return meta
    if marker_path.is_file():
        if not locked:
            return None
        try:
            diff = _differences(json.loads(marker_path.read_text()), identity)
        except ValueError:
            diff = "its in-progress marker is unreadable"
        if diff:
            raise PrepareError(f"{out} holds an unfinished preparation of other data ({diff}); delete {out} or "
                               "choose another --out")
        return None
    if any(p.name != LOCK_NAME for p in out.iterdir()):  # the lock file alone: a run that died before writing
        raise PrepareError(f"--out {out} is not empty and was not written by prepare_data; choose an empty or "
                           "new directory")
    return None


# ---------------------------------------------------------------------------------------------
# The pipeline


def _open_sources(o: PrepareOptions, identity: dict) -> tuple[sources.Source, sources.Source]:
    val_fraction = identity["options"]["val_fraction"]
    if o.dataset:
        return (instruct.hf_pair_sources if o.instruct else sources.hf_sources)(o.dataset)
    if o.builtin and o.instruct:
        pairs = builtin.write_instruct_stories(o.builtin_stories, o.seed)
        whole = sources.Source(lambda: iter(pairs), identity["source"], sum(len(s) for _, s in pairs))
        return sources.split_off(whole, val_fraction, o.seed)
    if o.builtin:
        whole = sources.list_source(builtin.write_stories(o.builtin_stories, o.seed), identity["source"])
        return sources.split_off(whole, val_fraction, o.seed)
    files = instruct.file_pair_source if o.instruct else sources.file_source
    train = files(o.train, "--train")
    if o.val:
        return train, files(o.val, "--val")
    return sources.split_off(train, val_fraction, o.seed)


def _capped(docs, max_chars: float):
    total = 0
    for d in docs:
        if total >= max_chars:
            return
        total += len(d)
        yield d


def _get_ranks(o: PrepareOptions, train: sources.Source) -> dict[bytes, int]:
    kind, vocab = parse_tokenizer_name(o.tokenizer)
    if kind == "gpt2":
        return gpt2_ranks(o.tokenizer_file)
    if o.tokenizer_file is not None:  # reuse a BPE trained before (e.g. for another data set)
        ranks = load_ranks(o.tokenizer_file)
        if len(ranks) + 1 != vocab:
            raise PrepareError(f"--tokenizer_file {o.tokenizer_file} has {len(ranks) + 1:,} tokens with "
                               f"<|endoftext|>, not {vocab:,}: use --tokenizer bpe:{len(ranks) + 1}")
        return ranks
    t0 = time.perf_counter()
    texts = train.documents()
    if o.instruct:  # pairs: the BPE learns the requests' text and the stories'
        texts = (req.text() + story for req, story in texts)
    ranks = _interruptible(train_bpe, _capped(texts, o.bpe_train_mb * 1e6), vocab)
    log.info("trained %s on up to %.0f MB of training text in %.1f s", o.tokenizer, o.bpe_train_mb,
             time.perf_counter() - t0)
    return ranks


def _interruptible(fn, *args):
    """fn(*args) on a daemon thread, so that Ctrl-C stops the main thread at once: the BPE trainer runs in
    Rust and would not let Python see the signal until it has finished (minutes on a large corpus)."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    worker = threading.Thread(target=target, name="train-bpe", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)  # a short wait: the main thread takes the KeyboardInterrupt between waits
    if "error" in result:
        raise result["error"]
    return result["value"]


def prepare(o: PrepareOptions) -> dict:
    """Prepare `o.out` and return its meta (or the existing meta when it is already complete)."""
    t_start = time.perf_counter()
    out = Path(o.out)
    identity = _identity(o)
    existing = _check_output(out, identity, locked=False)  # reads only: a refusal here writes nothing
    if existing is None:
        created = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
        lock = DirLock(out, "bin/prepare_data")
        try:
            lock.acquire()  # LockedError (a ValueError) names the run that holds it
            existing = _check_output(out, identity, locked=True)  # again: another run may have finished
            if existing is None:
                return _prepare_locked(o, out, identity, t_start)
        finally:
            lock.release(remove=True)  # a finished output keeps no lock file; a killed run leaves a harmless one
            for d in created:  # rmdir removes only an empty directory: a failed first run leaves none behind
                with contextlib.suppress(OSError):
                    d.rmdir()
    log.info("%s is already complete for these options (%s); nothing to do", out,
             ", ".join(f"{s}: {existing['splits'][s]['tokens']:,} tokens" for s in SPLITS))
    return existing


def _prepare_locked(o: PrepareOptions, out: Path, identity: dict, t_start: float) -> dict:
    """Steps 4 and 5 of the module docstring, holding the lock on `out`."""
    train, val = _open_sources(o, identity)
    train.check_not_empty("the training source")
    val.check_not_empty("the validation source")
    if is_hf_spec(o.tokenizer):  # an imported tokenizer.json: nothing to train, ids as it gives them
        ranks, enc = None, load_hf_spec(o.tokenizer)
    else:
        ranks = _get_ranks(o, train)
        enc = make_encoding(o.tokenizer, ranks, GPT2_PAT_STR)
    dtype = DTYPES[2]  # parse_tokenizer_name and check_ranks keep every id below 65,536
    num_proc = o.num_proc or default_num_proc()

    try:
        # Under the lock, _check_output has seen no meta.json and at most a dead run's marker of this same
        # command: its files are the only ones we remove. Start again from nothing.
        for stale in out.iterdir():
            if stale.name not in (MARKER_FILE, LOCK_NAME) and _ours(stale):
                stale.unlink()
        write_json_atomic(out / MARKER_FILE, identity)
        if ranks is None:
            with naming_the_file(out / HF_TOKENIZER_FILE):
                tok_meta = write_hf_tokenizer(enc, out, source=o.tokenizer[3:])
        else:
            with naming_the_file(out / TOKENIZER_FILE):
                dump_ranks(ranks, out / TOKENIZER_FILE)
            tok_meta = {"name": o.tokenizer, "vocab_size": enc.n_vocab, "eot_id": enc.eot_token,
                        "file": TOKENIZER_FILE, "sha256": file_sha256(out / TOKENIZER_FILE), "pat_str": GPT2_PAT_STR}
        splits = {}
        for split, src in (("train", train), ("val", val)):
            splits[split] = _write_split(out, split, src, enc, dtype, num_proc, o)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok_meta,
            "dtype": dtype.name,
            **identity,
            "splits": splits,
        }
        if o.instruct:
            meta["instruct"] = {"template": instruct.Request.make(words=["kite", "rain"], features=["Dialogue"],
                                                                  summary="...").text(),
                                "mask": "{split}_NNNNNN.mask beside each shard: uint8 per token, 1 = loss target "
                                        "(story tokens and the EOT closing each story)",
                                "bytes": "UTF-8 bytes of the stories only"}
        write_json_atomic(out / META_FILE, meta)  # last: its presence marks a complete output
        (out / MARKER_FILE).unlink()
        log.info("done in %.1f s: %s (%s, vocab %s, eot %d)", time.perf_counter() - t_start, out, o.tokenizer,
                 f"{enc.n_vocab:,}", enc.eot_token)
    except BaseException:
        with _sigint_held():  # a second Ctrl-C must not stop the clean-up half way
            for path in out.iterdir():  # leave nothing half-made behind (a SIGKILL skips this; see above)
                if path.name != LOCK_NAME and _ours(path):
                    path.unlink()
        raise
    return meta


@contextlib.contextmanager
def _sigint_held():
    """Ignore SIGINT for the block (main thread only; elsewhere Python delivers no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def _write_split(out: Path, split: str, src: sources.Source, enc, dtype, num_proc: int,
                 o: PrepareOptions) -> dict:
    writer = ShardWriter(out, split, o.shard_tokens, dtype, masks=o.instruct)
    documents = nbytes = 0
    t0 = time.perf_counter()
    encoded = (instruct.encode_pairs(enc, src.documents(), dtype, num_proc) if o.instruct
               else encode_documents(enc, src.documents(), dtype, num_proc))
    with tqdm(total=src.size_bytes, unit="B", unit_scale=True, desc=f"{split} ({num_proc} workers)",
              disable=None if o.progress is None else not o.progress, file=sys.stderr) as bar:
        for chunk in encoded:
            writer.add(chunk.tokens, getattr(chunk, "mask", None))
            documents += chunk.documents
            nbytes += chunk.bytes
            bar.update(chunk.bytes)
    names = writer.close()
    dt = time.perf_counter() - t0
    log.info("%s: %s documents, %s tokens, %.1f MB of text in %d shard(s), %.1f s (%.1f MB/s)", split,
             f"{documents:,}", f"{sum(writer.counts):,}", nbytes / 1e6, len(names), dt, nbytes / 1e6 / max(dt, 1e-9))
    info = {"tokens": sum(writer.counts), "documents": documents, "bytes": nbytes, "shards": names,
            "shard_token_counts": writer.counts}
    if o.instruct:
        info.update(masks=writer.mask_names, target_tokens=writer.targets)
    return info


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser(prog: str = "bin/prepare_data") -> argparse.ArgumentParser:
    """Usage errors are one line and exit 2 (OneLineErrorParser); each default is said once, in its help."""
    p = OneLineErrorParser(prog=prog, description="Tokenize stories into uint16 token shards "
                           "(OUT/{train,val}_NNNNNN.bin), OUT/tokenizer.tiktoken and OUT/meta.json.")
    src = p.add_argument_group("source (exactly one)")
    src.add_argument("--dataset", help="Hugging Face dataset name, e.g. roneneldan/TinyStories (train + validation)")
    src.add_argument("--train", nargs="+", default=[], metavar="FILE",
                     help="local .txt (stories separated by <|endoftext|> lines), .jsonl/.json ('text'), .parquet")
    src.add_argument("--val", nargs="+", default=[], metavar="FILE", help="validation files (with --train)")
    src.add_argument("--builtin", action="store_true", help="stories from the built-in seeded story writer")
    src.add_argument("--builtin_stories", type=int, default=DEFAULT_BUILTIN_STORIES,
                     help=f"how many built-in stories (default {DEFAULT_BUILTIN_STORIES:,}, ~0.57 KB each)")
    src.add_argument("--instruct", action="store_true",
                     help="the source holds request/story pairs (TinyStoriesInstruct .txt, JSONL with 'story' and "
                     "'request' or 'words'/'features'/'summary'; --builtin writes them): shards get a loss mask "
                     "that counts only the story tokens")
    src.add_argument("--val_fraction", type=float, default=None,
                     help=f"fraction of a single source held out for val (default {DEFAULT_VAL_FRACTION})")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default="gpt2", help="gpt2, bpe:N (a byte-level BPE of vocabulary N trained "
                     "on the training text) or hf:PATH (a tokenizer.json, or a model or run directory holding one, "
                     "e.g. an imported model's run); default gpt2")
    tok.add_argument("--tokenizer_file", default=None, metavar="PATH",
                     help="a .tiktoken ranks file: GPT-2's for offline use, or an earlier bpe:N to reuse")
    tok.add_argument("--bpe_train_mb", type=float, default=DEFAULT_BPE_TRAIN_MB,
                     help=f"train bpe:N on at most this many MB of training text (default {DEFAULT_BPE_TRAIN_MB:g})")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--num_proc", type=int, default=None, help="tokenizer workers (default: all cores)")
    p.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard, at least {MIN_SHARD_TOKENS:,} (default {DEFAULT_SHARD_TOKENS:,}; the "
                   "last shard takes the tail)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the built-in stories and the val split "
                   "(default 1337)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(e: OSError) -> str:
    """One sentence for a failed file operation: which file, what went wrong, what to do. Only a full disk
    (or quota, or file size limit) is called a full disk."""
    names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None) or "a file"
    what = e.strerror or str(e)
    if e.errno in _DISK_FULL:
        advice = ("free some space (or choose an --out on another disk) and run the same command again; "
                  "what this run wrote was removed")
    elif e.errno in (errno.EACCES, errno.EPERM):
        advice = "check the permissions, or choose another path"
    elif e.errno == errno.EROFS:
        advice = "choose an --out on a writable file system"
    else:
        advice = "check the path"
    return f"{names}: {what}; {advice}"


def main(argv: list[str] | None = None, prog: str = "bin/prepare_data") -> int:
    args = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    opts = PrepareOptions(out=args.out, tokenizer=args.tokenizer, tokenizer_file=args.tokenizer_file,
                          dataset=args.dataset, train=args.train, val=args.val, builtin=args.builtin,
                          builtin_stories=args.builtin_stories, val_fraction=args.val_fraction,
                          shard_tokens=args.shard_tokens, seed=args.seed, num_proc=args.num_proc,
                          bpe_train_mb=args.bpe_train_mb, progress=False if args.no_progress else None,
                          instruct=args.instruct)
    try:
        prepare(opts)
    except ValueError as e:  # every expected failure: one line, what to change
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a path through a file, ...
        print(f"{prog}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing unfinished was kept in {args.out}; run the same command again to "
              "prepare it", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
