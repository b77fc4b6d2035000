"""The token shard format, written by data_prep and read by storyllama.data.

A shard `DIR/{split}_NNNNNN.bin` is a 64-byte header followed by little-endian tokens:

    offset  size  field
    0       8     magic b"SLTOKENS"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token (uint32: 2 for uint16, 4 for uint32)
    16      8     token count (uint64)
    24      40    zero padding

Request/story data (bin/prepare_data --instruct, data_prep/instruct.py) also has a loss-mask shard
`DIR/{split}_NNNNNN.mask` beside each token shard: the same header with magic b"SLLOSSMK" and 1 byte per
entry, then one uint8 per token of its token shard (1 = a loss target).

Shards are written to `NAME.tmp` and renamed when complete, so a half-written shard never has the
final name. `meta.json` is written last, the same way: its presence marks a complete output.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from pathlib import Path

import numpy as np

MAGIC = b"SLTOKENS"
FORMAT_VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")  # magic, version, itemsize, count (24 bytes; the rest is padding)
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
MASK_MAGIC = b"SLLOSSMK"
MASK_DTYPES = {1: np.dtype("u1")}
# Test hooks: half way through writing each shard (or, for the second, while encoding each chunk of text), sleep
# this many seconds, or with "@PATH" make PATH.waiting and wait until PATH exists (see `pause_for_test`).
PAUSE_ENV = "STORYLLAMA_TEST_PAUSE_IN_SHARD_WRITE"
PAUSE_TOKENIZE_ENV = "STORYLLAMA_TEST_PAUSE_IN_TOKENIZE"


class ShardError(ValueError):
    """A shard or a data directory that cannot be read as written by prepare_data."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65,536), else uint32 (said in each shard's header)."""
    return DTYPES[2] if vocab_size <= 65536 else DTYPES[4]


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, magic: bytes = MAGIC) -> None:
    """Write tokens (uint16 or uint32; uint8 for a mask shard) to `path` atomically: a temporary file, fsync,
    rename."""
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    dtypes = MASK_DTYPES if magic == MASK_MAGIC else DTYPES
    if tokens.dtype.itemsize not in dtypes or tokens.dtype.kind != "u":
        raise ShardError(f"shard entries must be {' or '.join(str(d) for d in dtypes.values())}, got {tokens.dtype}")
    tokens = tokens.astype(dtypes[tokens.dtype.itemsize], copy=False)  # little-endian on disk
    header = _HEADER.pack(magic, FORMAT_VERSION, tokens.dtype.itemsize, tokens.size).ljust(HEADER_BYTES, b"\0")
    tmp = path.with_name(path.name + ".tmp")
    data = memoryview(tokens).cast("B")
    with naming_the_file(tmp):
        with open(tmp, "wb") as f:
            f.write(header)
            pause = os.environ.get(PAUSE_ENV)
            if pause:  # test hook: stop half way through the data so a test can kill the process here
                f.write(data[: len(data) // 2])
                f.flush()
                pause_for_test(pause)
                f.write(data[len(data) // 2 :])
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def pause_for_test(how: str) -> None:
    """"SECONDS": sleep; "@PATH": create PATH.waiting (so a test knows we are here), wait for PATH (at most 300 s)."""
    if not how.startswith("@"):
        time.sleep(float(how))
        return
    path = how[1:]
    with open(path + ".waiting", "a"):
        pass
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def naming_the_file(path: Path):
    """A failed write() or fsync() raises an OSError that names no file: name the one being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def read_header(path: str | Path, magic: bytes = MAGIC) -> tuple[np.dtype, int]:
    """Check a shard's header and size; return (token dtype, token count). Errors name the file."""
    dtypes = MASK_DTYPES if magic == MASK_MAGIC else DTYPES
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist; run bin/prepare_data again for this directory")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, shorter than its {HEADER_BYTES}-byte header: "
                         "it is truncated; delete the data directory and run bin/prepare_data again")
    found, version, itemsize, count = _HEADER.unpack_from(raw)
    if found != magic:
        raise ShardError(f"{path} is not a StoryLlama {'mask' if magic == MASK_MAGIC else 'token'} shard (magic "
                         f"{found!r}, expected {magic!r})")
    if version != FORMAT_VERSION:
        raise ShardError(f"shard {path} has format version {version}; this StoryLlama reads version "
                         f"{FORMAT_VERSION}: prepare the data again with this version")
    if itemsize not in dtypes:
        raise ShardError(f"shard {path} says {itemsize} bytes per token; only {', '.join(map(str, dtypes))} exist")
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise ShardError(f"shard {path} is {size} bytes but its header says {count} tokens ({expected} bytes): "
                         "it is truncated or corrupt; delete the data directory and run bin/prepare_data again")
    return dtypes[itemsize], int(count)


def mask_name(shard: str) -> str:
    """The mask shard beside token shard `shard`: train_000000.bin -> train_000000.mask."""
    return shard[: -len(".bin")] + ".mask"


def open_shard(path: str | Path, magic: bytes = MAGIC) -> np.memmap:
    """Check the header and map the tokens (or mask) read-only (once per shard, never per batch)."""
    dtype, count = read_header(path, magic)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def write_json_atomic(path: str | Path, obj: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with naming_the_file(tmp), open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Cut one split's token stream into shards `DIR/{split}_NNNNNN.bin` of `shard_tokens` tokens.

    Every shard holds exactly `shard_tokens` tokens except the last, which also takes the tail
    (between `shard_tokens` and 2 * `shard_tokens` - 1 tokens; fewer only when the whole split is
    smaller), so no shard is a sliver too short for a training window. To know which shard is the
    last, one full shard is held in memory until more tokens arrive (peak ~2 * shard_tokens tokens).
    """

    def __init__(self, out_dir: str | Path, split: str, shard_tokens: int, dtype: np.dtype, masks: bool = False):
        if shard_tokens < 1:
            raise ShardError(f"--shard_tokens {shard_tokens} must be at least 1 (e.g. 50000000)")
        self.out_dir, self.split, self.shard_tokens, self.dtype = Path(out_dir), split, shard_tokens, dtype
        self.masks = masks  # also write a loss-mask shard beside each token shard (add() then takes a mask)
        self.names: list[str] = []  # shard file names written so far
        self.counts: list[int] = []  # their token counts
        self.mask_names: list[str] = []
        self.targets = 0  # mask entries that are 1, over the shards written
        self._parts: list[np.ndarray] = []
        self._mask_parts: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        if self.masks != (mask is not None) or (mask is not None and mask.shape != tokens.shape):
            raise ShardError("a ShardWriter with masks takes one mask entry per token, one without takes none")
        self._parts.append(tokens)
        if mask is not None:
            self._mask_parts.append(mask)
        self._buffered += tokens.size
        while self._buffered >= 2 * self.shard_tokens:  # a full shard and at least one more behind it
            flat = np.concatenate(self._parts)
            flat_mask = np.concatenate(self._mask_parts) if self.masks else None
            self._write(flat[: self.shard_tokens], None if flat_mask is None else flat_mask[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self._parts, self._buffered = [rest], rest.size
            self._mask_parts = [flat_mask[self.shard_tokens :]] if self.masks else []

    def close(self) -> list[str]:
        """Write what is left as the last shard; return the shard file names in order."""
        if self._buffered:
            self._write(np.concatenate(self._parts), np.concatenate(self._mask_parts) if self.masks else None)
        self._parts, self._mask_parts, self._buffered = [], [], 0
        return self.names

    @property
    def tokens(self) -> int:
        return sum(self.counts) + self._buffered

    def _write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        name = shard_name(self.split, len(self.names))
        if mask is not None:  # the mask first: a token shard whose mask is missing would never look whole anyway
            write_shard(self.out_dir / mask_name(name), mask.astype(np.uint8, copy=False), MASK_MAGIC)
            self.mask_names.append(mask_name(name))
            self.targets += int(mask.sum())
        write_shard(self.out_dir / name, tokens.astype(self.dtype, copy=False))
        self.names.append(name)
        self.counts.append(int(tokens.size))
