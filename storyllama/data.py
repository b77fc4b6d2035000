"""Reading prepared token shards: memory-mapped once, checked against meta.json, cut into batches.

A split (`train` or `val`) is the shards listed in meta.json, each mapped read-only with np.memmap
when `TokenData` is made and never reopened. A batch is B windows of `block_size + 1` tokens:
x = window[:-1], y = window[1:]. Windows start every `block_size` tokens inside a shard, so
neighbours share one token (the last target of one window is the first input of the next) and every
token of a shard except its first is a target exactly once per epoch. Windows never cross a shard
boundary (the writer keeps every shard at least `--shard_tokens` long, so little is lost).

Training order (`RandomBatches`): epoch e shuffles all windows with numpy's generator seeded by
(seed, e). An optimizer step takes G = W * B * A consecutive windows of that order (W ranks, micro-batch
B, A accumulation micro-steps): micro-step m of step k on rank r reads the B windows starting at
k * G + (m * W + r) * B. So the batch at stream position p is a pure function of (seed, p, rank,
world_size), ranks never share a window within an epoch, together they cover the epoch's windows (all
but fewer than G of them), and a step reads the same G windows whatever W, B and A are, as long as G
is the same. The position is saved as windows consumed, a number that does not depend on W: a run
saved by W processes resumes on W' with another micro-batch or accumulation when G stays the same.

Document-aligned training (`RandomBatches(..., doc_aligned=True)`, `bin/train --doc_aligned`): every
story is followed by the end-of-text token, so a story starts at shard position 0 or right after an EOT.
The stories of each shard are indexed once, when the RandomBatches is built (one numpy pass over the
shard), and the shard is tiled with windows that start at story starts: a window starts at a story start s;
the next one starts at the start of the story that the window cuts (the last story start at or before
s + block_size + 1), so a cut story is read again from its beginning and every story that fits in a
window is seen whole, from its own start, at least once per epoch. A story longer than block_size goes on at
s + k * block_size (k >= 1). A shard's last window ends at the shard's end (its start moved back to
size - block_size - 1), so every token but a story's first is a target at least once per epoch (a story's
first token follows the previous story's EOT: the model masks that target, see Llama.forward). The cut
stories read twice cost about half a story per window (measured on TinyStories in the README); one window
per story start would read each token about block_size / story length times. The epoch permutation is
over these windows, with the same stepping rule, and no per-epoch shift; `window_targets` counts each
window's scored targets (block_size minus the EOTs among its inputs) so the trainer can divide a step's
summed loss by the step's count: the same loss whatever the world size, micro-batch and accumulation.

Validation (`val_batches`) walks the windows in order: global batch k is windows kB..kB+B-1, and
rank r takes batches r, r + W, r + 2W, ... (the same number on every rank).

Request/story data (`bin/prepare_data --instruct`) has a loss-mask shard beside each token shard (uint8
per token, 1 = a story token, a loss target): the mask is gathered with the same windows, and every target
whose mask is 0 (a request token) becomes -100, which the loss ignores; so do the story tokens at the head of a
window that precede its first request token (the window cut off their request: `masks_with_request_in_view`).
Training and validation count the loss on the story tokens whose request is in view, and bits per byte divide
by the stories' bytes per story token (`bytes_per_token`). Document-aligned, a pair (request, story, EOT) is
one document: a window opens with a request, attention stays inside its pair, so every story token that fits
is scored with its own request in view and no earlier story's words; `window_targets` then counts those
targets (`_masked_targets`).

Every batch is checked against the vocabulary of meta.json on the host, before it becomes a tensor: an
id out of range (a corrupt shard, or shards of another tokenizer) is a DataError naming the shard,
the id and the vocabulary, instead of an index error in the embedding (a device-side assert on CUDA).
The check is the max of the gathered uint16 windows, within the noise of the gather itself (~0.08 ms
for 16 x 513 tokens, ~0.28 ms for 64 x 1025 on the 2-core machine); a pass over every shard at load
would cost ~0.1 s per 100M tokens read cold (0.02 s cached) at each start, on each rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from storyllama.data_prep.shards import FORMAT_VERSION, MASK_MAGIC, ShardError, open_shard, token_dtype
from storyllama.inputs import InputError, read_json

SPLITS = ("train", "val")


_ID_LIMIT = {2: 1 << 16, 4: 1 << 32}  # ids a token of this many bytes can hold; a vocabulary that large needs no check


class DataError(ValueError):
    """A data directory, split or batch shape that cannot be read or served; the message says what to change."""


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared data directory (present only when preparation finished)."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        if not data_dir.is_dir():
            raise DataError(f"data directory {data_dir} does not exist; create it with bin/prepare_data --out "
                            f"{data_dir} (e.g. --builtin --tokenizer bpe:4096)")
        raise DataError(f"{data_dir} has no meta.json: it is not prepared, or its preparation did not finish; "
                        f"run bin/prepare_data --out {data_dir} ...")
    try:
        meta = read_json(path)
    except InputError as e:
        raise DataError(f"{str(e)[:300]}; run bin/prepare_data again for {data_dir}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {str(meta.get('format_version'))[:40]}; this StoryLlama reads "
                        f"{FORMAT_VERSION}: prepare the data again")
    for key in ("tokenizer", "splits"):
        if key not in meta:
            raise DataError(f"{path} has no {key!r} entry; prepare the data again")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path}: {problem}; prepare the data again (bin/prepare_data --out {data_dir} ...)")
    return meta


def _count(v, low: int = 0, high: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _plain_name(v) -> bool:
    """A file name inside the data directory: no separators, no '..' (meta.json never points outside it)."""
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\0" not in v


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's fields (types and ranges the readers rely on), or None. Checked when the
    data is opened, so a bad field stops a run before its first step, not at its first evaluation."""
    tok = meta["tokenizer"]
    if not isinstance(tok, dict):
        return "'tokenizer' is not an object"
    if not _count(tok.get("vocab_size"), 2, 1 << 32):
        return f"tokenizer.vocab_size must be an integer from 2 to {1 << 32:,}, got {str(tok.get('vocab_size'))[:40]}"
    if not _count(tok.get("eot_id"), 0, tok["vocab_size"] - 1):
        return f"tokenizer.eot_id must be an integer below vocab_size {tok['vocab_size']:,}, got " \
               f"{str(tok.get('eot_id'))[:40]}"
    if "file" in tok and not _plain_name(tok["file"]):
        return "tokenizer.file must be a file name in the data directory"
    splits = meta["splits"]
    if not isinstance(splits, dict) or not splits:
        return "'splits' is not an object of splits"
    for name, info in splits.items():
        if not isinstance(info, dict):
            return f"splits.{str(name)[:20]} is not an object"
        for key in ("tokens", "bytes"):
            if not _count(info.get(key)):
                return f"splits.{name}.{key} must be a non-negative integer, got {str(info.get(key))[:40]}"
        if "target_tokens" in info and not _count(info["target_tokens"], 0, info["tokens"]):
            return f"splits.{name}.target_tokens must be an integer from 0 to its tokens ({info['tokens']:,})"
        if info["tokens"] and not info["bytes"]:
            return f"splits.{name}.bytes is 0 for {info['tokens']:,} tokens (bits per byte would divide by it)"
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(_plain_name(s) for s in shards):
            return f"splits.{name}.shards must be a list of file names in the data directory"
        counts = info.get("shard_token_counts")
        if counts is not None and (not isinstance(counts, list) or len(counts) != len(shards)
                                   or not all(_count(c) for c in counts)):
            return f"splits.{name}.shard_token_counts must be one non-negative integer per shard"
    return None


def bytes_per_token(meta: dict, split: str = "val") -> float:
    """UTF-8 bytes of text per token in `split` (EOT tokens included): bits/byte = loss / ln 2 / this.

    Request/story data: bytes of the stories per target token (story tokens and their EOT), since the loss is
    the mean over those tokens only; the requests' bytes are not counted."""
    info = meta["splits"][split]
    tokens = info.get("target_tokens", info["tokens"])
    if not tokens:
        raise DataError(f"the {split} split has no tokens; prepare the data again with more text")
    return info["bytes"] / tokens


class TokenData:
    """One split of a prepared data directory, every shard mapped once and checked against meta.json.

    `block_size`, when given, is checked now: every shard must hold one window (block_size + 1 tokens).
    Attributes: `meta`, `split`, `shards` (np.memmap each), `shard_files`, `num_tokens`, `vocab_size`, `eot_id`.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", block_size: int | None = None):
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = load_meta(self.data_dir)
        tok = self.meta["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eot_id: int = int(tok["eot_id"])
        info = self.meta["splits"].get(split)
        if info is None:
            raise DataError(f"{self.data_dir / 'meta.json'} has no {split!r} split (it has "
                            f"{', '.join(self.meta['splits'])}); use one of those")
        expected = token_dtype(self.vocab_size)
        counts = info.get("shard_token_counts")
        self.shard_files = [self.data_dir / name for name in info["shards"]]
        self.shards: list[np.memmap] = []
        for i, path in enumerate(self.shard_files):
            try:
                mm = open_shard(path)
            except ShardError as e:
                raise DataError(str(e)) from None
            if mm.dtype != expected:
                raise DataError(f"{path} holds {mm.dtype} tokens, but the vocabulary of {self.vocab_size:,} in "
                                f"meta.json needs {expected}; prepare the data again")
            if counts is not None and mm.size != counts[i]:
                raise DataError(f"{path} holds {mm.size:,} tokens, but meta.json says {counts[i]:,}: the shard "
                                "does not belong to this meta.json; prepare the data again")
            self.shards.append(mm)
        self.masks: list[np.memmap] | None = None  # loss masks (request/story data), one per shard
        if "masks" in info:
            self.masks = []
            for path, mm in zip(self.shard_files, self.shards, strict=True):
                mpath = self.data_dir / (path.name[: -len(".bin")] + ".mask")
                try:
                    mask = open_shard(mpath, MASK_MAGIC)
                except ShardError as e:
                    raise DataError(str(e)) from None
                if mask.size != mm.size:
                    raise DataError(f"{mpath} holds {mask.size:,} mask entries for the {mm.size:,} tokens of {path}; "
                                    "prepare the data again")
                self.masks.append(mask)
        self.num_tokens = sum(int(mm.size) for mm in self.shards)
        if self.num_tokens != info["tokens"]:
            raise DataError(f"the {split} shards of {self.data_dir} hold {self.num_tokens:,} tokens, but meta.json "
                            f"says {info['tokens']:,}; prepare the data again")
        if self.num_tokens == 0:
            raise DataError(f"the {split} split of {self.data_dir} has no tokens; prepare it with a source that "
                            f"has {split} documents")
        if block_size is not None:
            self.check_block_size(block_size)

    def check_block_size(self, block_size: int) -> None:
        """Every shard must hold at least one window of block_size + 1 tokens."""
        if block_size < 1:
            raise DataError(f"block_size {block_size} must be at least 1")
        for path, mm in zip(self.shard_files, self.shards, strict=True):
            if mm.size < block_size + 1:
                raise DataError(f"{path} holds {mm.size:,} tokens, fewer than one window of block_size + 1 = "
                                f"{block_size + 1:,}; use a smaller block_size, or prepare the data again with more "
                                "text or a larger --shard_tokens")

    def windows_per_shard(self, block_size: int) -> np.ndarray:
        """How many windows (stride block_size, length block_size + 1) each shard holds."""
        self.check_block_size(block_size)
        return np.array([(mm.size - 1) // block_size for mm in self.shards], dtype=np.int64)

    def gather(self, window_ids: np.ndarray, block_size: int, cum_windows: np.ndarray, shift: int = 0) -> np.ndarray:
        """Windows by global index (shard-major order) -> int64 array (len(window_ids), block_size + 1).
        Window k of a shard starts at token shift + k * block_size."""
        shard_of = np.searchsorted(cum_windows, window_ids, side="right") - 1
        starts = (window_ids - cum_windows[shard_of]) * block_size + shift
        return self.gather_at(shard_of, starts, block_size)

    def gather_at(self, shard_of: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
        """Windows of block_size + 1 tokens at token `starts` of shards `shard_of` -> int64 (len, block_size + 1)."""
        out = np.empty((len(starts), block_size + 1), dtype=np.int64)
        offsets = np.arange(block_size + 1, dtype=np.int64)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            tokens = self.shards[s][starts[rows, None] + offsets]  # one fancy-index read per shard
            if self.vocab_size < _ID_LIMIT[tokens.dtype.itemsize] and int(tokens.max()) >= self.vocab_size:
                self._out_of_vocab(s, tokens, starts[rows])
            out[rows] = tokens
        return out

    def gather_masks(self, window_ids: np.ndarray, block_size: int, cum_windows: np.ndarray,
                     shift: int = 0) -> np.ndarray | None:
        """The loss masks of the windows `gather` returns (bool, same shape), or None for plain data."""
        if self.masks is None:
            return None
        shard_of = np.searchsorted(cum_windows, window_ids, side="right") - 1
        starts = (window_ids - cum_windows[shard_of]) * block_size + shift
        return self.gather_masks_at(shard_of, starts, block_size)

    def gather_masks_at(self, shard_of: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray | None:
        """The loss masks of the windows `gather_at` returns (bool, same shape), or None for plain data."""
        if self.masks is None:
            return None
        out = np.empty((len(starts), block_size + 1), dtype=bool)
        offsets = np.arange(block_size + 1, dtype=np.int64)
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            out[rows] = self.masks[s][starts[rows, None] + offsets] != 0
        return out

    def _out_of_vocab(self, s: int, tokens: np.ndarray, starts: np.ndarray) -> None:
        row, col = np.unravel_index(int(np.argmax(tokens >= self.vocab_size)), tokens.shape)
        raise DataError(f"{self.shard_files[s]} holds token id {int(tokens[row, col]):,} (at token "
                        f"{int(starts[row]) + col:,}), outside the vocabulary of {self.vocab_size:,} that "
                        f"{self.data_dir / 'meta.json'} records: the shard is corrupt or was made with another "
                        "tokenizer; prepare the data again")


_INDEX_CHUNK = 1 << 24  # tokens compared with the EOT at a time: bounds the index's temporary to 16 MB


def eot_positions(shard: np.ndarray, eot_id: int) -> np.ndarray:
    """Positions of the end-of-text token in a shard (int64, sorted): one pass, in chunks."""
    parts = [np.flatnonzero(shard[i : i + _INDEX_CHUNK] == eot_id) + i for i in range(0, shard.size, _INDEX_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def doc_window_starts(size: int, eots: np.ndarray, block_size: int) -> np.ndarray:
    """Document-aligned window starts of a shard of `size` tokens with EOTs at `eots` (see the module docstring).

    Candidates are the story starts (0 and every position after an EOT) and, inside a story [s, n) longer
    than a window, s + k * T while a target of the story is left (s + k * T < n - 1). From a window at c in
    story s the next window is the last story start a <= c + T + 1 (the story the window cuts, or the next
    one) when a > s, else the story's next chunk c + T. The chain stops at the first window that does not
    fit, moved back to end at the shard's end."""
    T = block_size
    starts = np.concatenate([[0], eots[eots + 1 < size] + 1]).astype(np.int64)  # story starts
    ends = np.append(starts[1:], size)  # each story's end (the next story's start)
    chunks = np.maximum(1, -(-(ends - 1 - starts) // T))  # windows a story needs on its own: ceil((n - 1 - s) / T)
    first = np.cumsum(chunks) - chunks  # candidate index of each story's start
    story = np.repeat(np.arange(len(starts)), chunks)  # (candidates,) the story of each candidate
    cand = starts[story] + (np.arange(int(chunks.sum())) - first[story]) * T  # (candidates,) sorted
    cut = np.searchsorted(starts, cand + T + 1, side="right") - 1  # last story start <= c + T + 1
    n = len(cand)
    jump = np.append(np.where(cut > story, first[cut], np.arange(1, n + 1)), n)  # (n + 1,) next window; n: the end
    on = np.zeros(n + 1, dtype=bool)  # candidates on the chain from 0, found by pointer doubling: after round k,
    on[0] = True  # the first 2^k windows (log2(windows) rounds of numpy, not one Python step per window)
    while not on[n]:
        on[jump[on]] = True
        jump = jump[jump]
    w = cand[on[:n]]
    last = size - T - 1
    if w[-1] > last:  # the chain's first window that does not fit ends the chain, moved back to end at size
        w = np.append(w[w < last], last)
    return w


def masks_with_request_in_view(masks: np.ndarray) -> np.ndarray:
    """Story tokens before a window's first request token are no targets: the window cut their request off.

    masks: (B, T + 1) bool, True = a story token. A window that starts inside a story holds its tail without
    the request it answers; trained on, it would teach the model to write a story whose request it cannot see.
    A window that starts inside a request keeps the story after it (part of the request is in view)."""
    is_request = ~masks
    first = np.where(is_request.any(axis=1), is_request.argmax(axis=1), masks.shape[1])  # (B,)
    return masks & (np.arange(masks.shape[1])[None, :] >= first[:, None])


def _masked_targets(data: TokenData, shard: int, starts: np.ndarray, block_size: int,
                    chunk: int = 4096) -> np.ndarray:
    """Scored targets of each document-aligned window of a request/story shard: the story targets that
    `_to_xy` keeps (`masks_with_request_in_view`) and the model scores (not after an EOT input); `chunk`
    windows at a time, so the temporary stays a few MB."""
    out = np.empty(len(starts), dtype=np.int64)
    offsets = np.arange(block_size + 1, dtype=np.int64)
    for i in range(0, len(starts), chunk):
        idx = starts[i : i + chunk, None] + offsets
        kept = masks_with_request_in_view(data.masks[shard][idx] != 0)[:, 1:]
        out[i : i + chunk] = (kept & (data.shards[shard][idx[:, :-1]] != data.eot_id)).sum(axis=1)
    return out


def _to_xy(windows: np.ndarray, masks: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows)  # (B, T + 1) int64
    x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)
    if masks is not None:  # request tokens are context, not targets (a new tensor: y may share x's storage)
        y = torch.where(torch.from_numpy(masks_with_request_in_view(masks)[:, 1:]), y, -100)
    return x, y


class RandomBatches:
    """Shuffled training batches; batch n is a pure function of (seed, n, rank, world_size).

    doc_aligned: windows start at story starts (the module docstring); no per-epoch shift then.

    Each epoch draws a permutation of the windows and, when every shard has room for it, a shift in
    [0, block_size) of all window starts: over several epochs the model sees the text cut at different
    places instead of the same windows again (cheap augmentation on small corpora)."""

    def __init__(self, data: TokenData, batch_size: int, block_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, accum: int = 1, doc_aligned: bool = False):
        if batch_size < 1 or world_size < 1 or accum < 1 or not 0 <= rank < world_size:
            raise DataError(f"need batch_size, accum >= 1 and 0 <= rank < world_size (got batch_size {batch_size}, "
                            f"accum {accum}, rank {rank}, world_size {world_size})")
        self.data, self.batch_size, self.block_size = data, batch_size, block_size
        self.seed, self.rank, self.world_size, self.accum = seed, rank, world_size, accum
        self.doc_aligned = doc_aligned
        per_shard = data.windows_per_shard(block_size)
        # With a shift s < block_size, window k ends at s + (k + 1) * block_size + 1 <= size when there are
        # (size - block_size) // block_size windows: the count stays the same whatever the shift.
        shifted = np.array([(mm.size - block_size) // block_size for mm in data.shards], dtype=np.int64)
        self.shifts = bool((shifted >= 1).all()) and not doc_aligned
        if self.shifts:
            per_shard = shifted
        if doc_aligned:  # index the stories once: windows start at story starts
            starts, targets = [], []
            for s, mm in enumerate(data.shards):
                eots = eot_positions(mm, data.eot_id)
                w = doc_window_starts(mm.size, eots, block_size)
                starts.append(w)
                if data.masks is None:  # scored targets: block_size minus the EOTs among the inputs [w, w + T)
                    targets.append(block_size - (np.searchsorted(eots, w + block_size) - np.searchsorted(eots, w)))
                else:  # request/story data: the story targets (with their request in view) that _to_xy keeps
                    targets.append(_masked_targets(data, s, w, block_size))
            per_shard = np.array([len(w) for w in starts], dtype=np.int64)
            self.win_shard = np.repeat(np.arange(len(starts)), per_shard)  # (num_windows,) shard of each window
            self.win_start = np.concatenate(starts)  # (num_windows,) its first token in that shard
            self.window_targets = np.concatenate(targets)  # (num_windows,) its scored targets
        self.cum_windows = np.concatenate([[0], np.cumsum(per_shard)])
        self.num_windows = int(self.cum_windows[-1])
        self.windows_per_step = world_size * batch_size * accum  # G: one optimizer step, all ranks
        self.steps_per_epoch = self.num_windows // self.windows_per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the {data.split} split of {data.data_dir} has {data.num_tokens:,} tokens = "
                            f"{self.num_windows:,} windows of block_size + 1 = {block_size + 1}, fewer than one "
                            f"optimizer step's batch_size {batch_size} x world_size {world_size} x accumulation "
                            f"{accum} = {self.windows_per_step:,}; use a smaller batch, block_size, or more data")
        self.batches_per_epoch = self.steps_per_epoch * accum  # this rank's micro-batches per epoch
        self.position = 0  # micro-batches this rank has taken: the only state
        self._epoch: int | None = None
        self._order: np.ndarray | None = None
        self._shift = 0

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    def shift_of_epoch(self, epoch: int) -> int:
        """Where windows start in `epoch`, relative to each shard's first token (0 <= shift < block_size)."""
        self._epoch_order(epoch)
        return self._shift

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._shift = int(rng.integers(self.block_size)) if self.shifts else 0
            self._epoch, self._order = epoch, rng.permutation(self.num_windows)
        return self._order

    def window_ids(self, position: int) -> np.ndarray:
        """Global window indices of the batch at stream `position` (for tests and debugging).

        Step k of the epoch is the G windows from k * G of the epoch's permutation; its micro-step m on
        rank r is the B of them from (m * W + r) * B: disjoint ranks, and W ranks x B read exactly what
        one process with W x B (or B and W x the accumulation) would."""
        epoch, p = divmod(position, self.batches_per_epoch)
        k, m = divmod(p, self.accum)
        start = k * self.windows_per_step + (m * self.world_size + self.rank) * self.batch_size
        return self._epoch_order(epoch)[start : start + self.batch_size]

    def batch_at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 CPU tensors of shape (B, T), of the batch at stream `position`."""
        ids = self.window_ids(position)  # also sets this epoch's shift
        if self.doc_aligned:
            shard_of, starts = self.win_shard[ids], self.win_start[ids]
            return _to_xy(self.data.gather_at(shard_of, starts, self.block_size),
                          self.data.gather_masks_at(shard_of, starts, self.block_size))
        return _to_xy(self.data.gather(ids, self.block_size, self.cum_windows, self._shift),
                      self.data.gather_masks(ids, self.block_size, self.cum_windows, self._shift))

    def step_targets(self, position: int) -> int:
        """Document-aligned: the scored targets of the whole optimizer step (all ranks, all micro-steps) that
        micro-batch `position` belongs to. A pure function of (seed, position): every rank knows it without
        a collective, and it is the same for any W, B and A with the same G."""
        epoch, p = divmod(position, self.batches_per_epoch)
        k = p // self.accum
        ids = self._epoch_order(epoch)[k * self.windows_per_step : (k + 1) * self.windows_per_step]
        return int(self.window_targets[ids].sum())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.position)
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position as windows consumed by all ranks: the same on every rank, whatever the world size."""
        if self.position % self.accum:
            raise DataError("the data position can only be saved between optimizer steps")
        return {"windows": self.position // self.accum * self.windows_per_step,
                "windows_per_step": self.windows_per_step, "seed": self.seed, "block_size": self.block_size,
                "num_windows": self.num_windows, "split": self.data.split, "doc_aligned": self.doc_aligned}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved in `state`, on any world size with the same windows per optimizer step;
        refuse one made with another seed, block size, data or step size."""
        if "windows" not in state:  # written before positions were global: this rank's micro-batches
            state = {**state, "windows": state["position"] * state["world_size"] * state["batch_size"],
                     "windows_per_step": state["world_size"] * state["batch_size"] * self.accum}
        saved_aligned = bool(state.get("doc_aligned", False))  # positions saved before the flag: plain windows
        if saved_aligned != self.doc_aligned:
            raise DataError(f"the run was saved with --doc_aligned {str(saved_aligned).lower()}; this one has "
                            f"--doc_aligned {str(self.doc_aligned).lower()}: the windows differ, so its data position "
                            f"means nothing here. Resume with --doc_aligned {str(saved_aligned).lower()}, or start a "
                            "new run (--init_from keeps the weights)")
        for key in ("seed", "block_size", "num_windows"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"the saved data position has {key} {state[key]}, but this run has "
                                f"{getattr(self, key)}; resume with the same {key} (and the same data), or start "
                                "a new run")
        if state["windows_per_step"] != self.windows_per_step:
            T = self.block_size
            raise DataError(
                f"the run was saved with {state['windows_per_step'] * T:,} tokens per optimizer step; this one has "
                f"{self.windows_per_step * T:,} (batch_size {self.batch_size} x block_size {T} x {self.world_size} "
                f"processes x {self.accum} accumulation). Keep --total_batch_size "
                f"{state['windows_per_step'] * T} so the data stream continues; the micro-batch and the number of "
                "processes may change")
        self.position = state["windows"] // self.windows_per_step * self.accum


def val_batches(data: TokenData, batch_size: int, block_size: int, rank: int = 0, world_size: int = 1,
                max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic pass over the split's windows in order; ranks take disjoint, equally many batches."""
    per_shard = data.windows_per_shard(block_size)
    cum = np.concatenate([[0], np.cumsum(per_shard)])
    total_batches = int(cum[-1]) // batch_size
    per_rank = total_batches // world_size
    if per_rank == 0:
        raise DataError(f"the {data.split} split of {data.data_dir} has {int(cum[-1]):,} windows of block_size + 1 = "
                        f"{block_size + 1}, fewer than batch_size {batch_size} x world_size {world_size}; use a "
                        "smaller batch_size, or prepare more validation data")
    if max_batches is not None:
        per_rank = min(per_rank, max_batches)
    for i in range(per_rank):
        k = rank + i * world_size
        ids = np.arange(k * batch_size, (k + 1) * batch_size, dtype=np.int64)
        yield _to_xy(data.gather(ids, block_size, cum), data.gather_masks(ids, block_size, cum))
