"""storyllama.data: shards checked against meta.json, random batches per (seed, step, rank), validation pass.

Most tests use a synthetic data directory whose token i of the stream is i itself, so a batch says
exactly which windows it took; one test reads a real prepared (built-in) directory.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from storyllama.data import DataError, RandomBatches, TokenData, bytes_per_token, load_meta, val_batches
from storyllama.data_prep.shards import HEADER_BYTES, shard_name, write_shard

RandomBatchesClass = RandomBatches


def make_data_dir(d: Path, train_sizes: list[int], val_sizes: list[int] = (500,), vocab: int = 65_536) -> Path:
    """A data directory in prepare_data's layout whose tokens are their stream positions (mod 65,536)."""
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        names, start = [], 0
        for i, n in enumerate(sizes):
            names.append(shard_name(split, i))
            write_shard(d / names[-1], (np.arange(start, start + n) % 65_536).astype(np.uint16))
            start += n
        splits[split] = {"tokens": start, "documents": 1, "bytes": 4 * start, "shards": names,
                         "shard_token_counts": list(sizes)}
    meta = {"format_version": 1, "dtype": "uint16", "splits": splits,
            "tokenizer": {"name": "test", "vocab_size": vocab, "eot_id": vocab - 1, "file": "tokenizer.tiktoken",
                          "sha256": "", "pat_str": ""}}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture
def data_dir(tmp_path) -> Path:
    # Three shards of 1,601 / 1,601 / 2,001 tokens: with T = 16 that is 100 + 100 + 125 = 325 windows.
    return make_data_dir(tmp_path / "d", [1601, 1601, 2001], [801])


EOT = 65_535  # make_data_dir's eot_id


def make_story_dir(d: Path, T: int = 16, seed: int = 0) -> Path:
    """Two train shards of stories (token = stream position, every story ending with EOT), of lengths around a
    window: a bare EOT, short, about T + 1, and several windows long."""
    rng = np.random.default_rng(seed)
    make_data_dir(d, [1500, 1300], [600])
    for name in ("train_000000.bin", "train_000001.bin", "val_000000.bin"):
        from storyllama.data_prep.shards import open_shard

        tokens = np.array(open_shard(d / name))
        pos = 0
        while pos < tokens.size:
            pos += int(rng.choice([1, rng.integers(2, 10), rng.integers(T - 1, T + 3), rng.integers(3 * T, 5 * T)]))
            tokens[min(pos, tokens.size) - 1] = EOT
        write_shard(d / name, tokens)
    return d


@pytest.fixture
def story_dir(tmp_path) -> Path:
    return make_story_dir(tmp_path / "stories")


def stories(shard: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of every story of a shard: each ends after its EOT."""
    ends = (np.flatnonzero(shard == EOT) + 1).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def window_starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()  # token value = stream position


def test_token_data_maps_and_checks(data_dir):
    d = TokenData(data_dir, "train")
    assert d.num_tokens == 5203 and d.vocab_size == 65_536 and d.eot_id == 65_535
    assert [type(m) for m in d.shards] == [np.memmap] * 3
    assert d.meta == load_meta(data_dir)


def test_batches_are_shifted_windows_from_the_shards(data_dir):
    d = TokenData(data_dir, "train")
    rb = RandomBatches(d, batch_size=8, block_size=16, seed=0)
    x, y = rb.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = np.concatenate([np.asarray(m) for m in d.shards]).astype(np.int64)
    for row_x, row_y in zip(x, y, strict=True):
        s = int(row_x[0])
        assert torch.equal(row_x, torch.from_numpy(stream[s : s + 16]))
        assert torch.equal(row_y, torch.from_numpy(stream[s + 1 : s + 17]))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_are_disjoint_and_cover_the_epoch(data_dir, world_size):
    d = TokenData(data_dir, "train")
    T, B = 16, 5
    ranks = [RandomBatches(d, B, T, seed=11, rank=r, world_size=world_size) for r in range(world_size)]
    per_epoch = ranks[0].batches_per_epoch
    # Every shard has room for a shifted window set: (size - T) // T windows each = 99 + 99 + 124.
    assert ranks[0].shifts and per_epoch == (322 // world_size) // B
    shift = ranks[0].shift_of_epoch(0)
    seen = [[s for _ in range(per_epoch) for s in window_starts(rb.next_batch()[0])] for rb in ranks]
    flat = [s for r in seen for s in r]
    assert len(flat) == len(set(flat)) == per_epoch * B * world_size  # disjoint, no repeats within the epoch
    # Together they cover every window but fewer than world_size * B of them (322 windows in all).
    shard_starts = [0, 1601, 3202]
    all_windows = {s0 + shift + k * T for s0, n in zip(shard_starts, [99, 99, 124], strict=True) for k in range(n)}
    assert set(flat) <= all_windows and len(all_windows - set(flat)) < world_size * B
    # Windows never cross a shard boundary.
    assert all(any(s0 <= s and s + T < s0 + n for s0, n in zip(shard_starts, [1601, 1601, 2001], strict=True))
               for s in flat)


def test_ranks_disjoint_and_exact_cover_when_divisible(tmp_path):
    d = TokenData(make_data_dir(tmp_path / "e", [8 * 49 + 1]), "train")  # 48 shifted windows of T = 8
    seen = []
    for r in range(4):
        rb = RandomBatches(d, 3, 8, seed=5, rank=r, world_size=4)
        seen += [s for _ in range(rb.batches_per_epoch) for s in window_starts(rb.next_batch()[0])]
    shift = rb.shift_of_epoch(0)
    assert sorted(seen) == list(range(shift, shift + 8 * 48, 8))


def test_each_epoch_cuts_the_text_at_a_new_place(tmp_path):
    d = TokenData(make_data_dir(tmp_path / "s", [8 * 49 + 1]), "train")
    rb = RandomBatches(d, 4, 8, seed=5)
    shifts = {rb.shift_of_epoch(e) for e in range(20)}
    assert len(shifts) > 3 and all(0 <= s < 8 for s in shifts)
    for e in range(3):  # every window of an epoch starts at that epoch's shift
        starts = window_starts(rb.batch_at(e * rb.batches_per_epoch)[0])
        assert all(s % 8 == rb.shift_of_epoch(e) for s in starts)


def test_data_too_small_to_shift_keeps_fixed_windows(tmp_path):
    d = TokenData(make_data_dir(tmp_path / "f", [8 + 1 + 3]), "train")  # one window of T = 8, no room to shift
    rb = RandomBatches(d, 1, 8, seed=5)
    assert not rb.shifts and rb.num_windows == 1
    assert all(window_starts(rb.next_batch()[0]) == [0] for _ in range(5))


def test_world_of_ranks_reads_what_one_process_with_the_global_batch_reads(data_dir):
    d = TokenData(data_dir, "train")
    one = RandomBatches(d, 12, 16, seed=2)
    ranks = [RandomBatches(d, 4, 16, seed=2, rank=r, world_size=3) for r in range(3)]
    for n in (0, 1, one.batches_per_epoch + 2):
        together = torch.cat([rb.batch_at(n)[0] for rb in ranks])
        assert torch.equal(together, one.batch_at(n)[0])


def test_same_seed_and_step_same_batch(data_dir):
    d = TokenData(data_dir, "train")
    a = RandomBatches(d, 4, 16, seed=3, rank=1, world_size=2)
    b = RandomBatches(TokenData(data_dir, "train"), 4, 16, seed=3, rank=1, world_size=2)
    stream_a = [a.next_batch()[0] for _ in range(100)]  # crosses several epochs
    for n in (0, 7, 99, 40, 3):
        assert torch.equal(b.batch_at(n)[0], stream_a[n])
    other_seed = RandomBatches(d, 4, 16, seed=4, rank=1, world_size=2)
    assert not torch.equal(other_seed.batch_at(0)[0], stream_a[0])
    other_rank = RandomBatches(d, 4, 16, seed=3, rank=0, world_size=2)
    assert not set(window_starts(other_rank.batch_at(0)[0])) & set(window_starts(stream_a[0]))
    # A new epoch is a new shuffle.
    k = a.batches_per_epoch
    e0 = [s for n in range(k) for s in window_starts(a.batch_at(n)[0])]
    e1 = [s for n in range(k, 2 * k) for s in window_starts(a.batch_at(n)[0])]
    assert e0 != e1 and len(set(e0)) == len(set(e1)) == k * 4


def test_state_dict_resume_continues_the_stream(data_dir):
    d = TokenData(data_dir, "train")
    a = RandomBatches(d, 6, 16, seed=9)
    for _ in range(30):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    expected = [a.next_batch() for _ in range(70)]  # into the next epochs
    b = RandomBatches(d, 6, 16, seed=9)
    b.load_state_dict(state)
    for xa, ya in expected:
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for key, value in (("seed", 10), ("block_size", 8)):
        with pytest.raises(DataError, match=key):
            b.load_state_dict({**state, key: value})
    with pytest.raises(DataError, match=r"saved with 80 tokens per optimizer step; this one has 96"):
        b.load_state_dict({**state, "windows_per_step": 5})


@pytest.mark.parametrize("doc_aligned", [False, True])
def test_a_step_reads_the_same_windows_on_any_world_size(data_dir, story_dir, doc_aligned):
    """G = W x B x A windows per optimizer step: (2 ranks, B 2, A 1), (1, 4, 1) and (1, 2, 2) read the same
    windows at every step, and a position saved by one continues in another (resume on another world size).
    Document-aligned windows too, and each layout counts the same scored targets per step."""
    d = TokenData(story_dir if doc_aligned else data_dir, "train")
    RandomBatches = functools.partial(RandomBatchesClass, doc_aligned=doc_aligned)

    def steps(layout: list[RandomBatches], n: int, start: int = 0) -> list[set[int]]:
        A = layout[0].accum
        return [{int(w) for rb in layout for m in range(A) for w in rb.window_ids((start + k) * A + m)}
                for k in range(n)]

    two = [RandomBatches(d, 2, 16, seed=4, rank=r, world_size=2) for r in range(2)]
    one = [RandomBatches(d, 4, 16, seed=4)]
    acc = [RandomBatches(d, 2, 16, seed=4, accum=2)]
    n = two[0].steps_per_epoch + 3  # into the second epoch
    assert steps(two, n) == steps(one, n) == steps(acc, n)
    for rb in two:
        rb.position = 5
    saved = json.loads(json.dumps(two[0].state_dict()))
    assert saved == two[1].state_dict() and saved["windows"] == 5 * 4
    acc[0].load_state_dict(saved)
    assert acc[0].position == 10
    assert steps(acc, 4, start=5) == steps(two, 4, start=5)
    if doc_aligned:
        for k in (0, 1, n - 1):
            counted = sum(int((rb.batch_at(k * rb.accum + m)[0] != EOT).sum()) for rb in acc for m in range(2))
            assert [rb.step_targets(k * rb.accum) for rb in (*two, *one, *acc)] == [counted] * 4
            assert acc[0].step_targets(k * 2 + 1) == counted  # any micro-step of the step


def test_doc_aligned_windows_start_at_story_starts_and_cover_every_target(story_dir):
    """Every window starts at a story start (or goes on with a story longer than a window, or is a shard's
    last window, which ends at the shard's end) and fits in its shard; every story that fits in a window is
    read whole from its start; one epoch scores every token but the stories' first as a target."""
    T = 16
    d = TokenData(story_dir, "train")
    rb = RandomBatches(d, 1, T, seed=0, doc_aligned=True)
    assert not rb.shifts and rb.batches_per_epoch == rb.num_windows  # G = 1: an epoch is every window
    shards = [np.asarray(mm).astype(np.int64) for mm in d.shards]
    scored = [np.zeros(s.size, dtype=bool) for s in shards]
    windows: list[set[int]] = [set(), set()]
    for pos in range(rb.batches_per_epoch):
        (w,) = rb.window_ids(pos)
        s, c = int(rb.win_shard[w]), int(rb.win_start[w])
        x, y = rb.batch_at(pos)
        assert c + T + 1 <= shards[s].size
        assert x[0].tolist() == shards[s][c : c + T].tolist() and y[0].tolist() == shards[s][c + 1 : c + T + 1].tolist()
        assert rb.window_targets[w] == int((x != EOT).sum())  # the target after an EOT is not scored
        scored[s][c + 1 : c + T + 1] |= (x[0] != EOT).numpy()
        windows[s].add(c)
    assert len(windows[0]) + len(windows[1]) == rb.num_windows  # no window twice in an epoch
    for s, shard in enumerate(shards):
        spans = stories(shard)
        allowed = {a + k * T for a, b in spans for k in range(max(1, -(-(b - 1 - a) // T)))} | {shard.size - T - 1}
        assert windows[s] <= allowed, sorted(windows[s] - allowed)
        starts = [a for a, _ in spans]
        assert scored[s][starts].sum() == 0 and scored[s][np.setdiff1d(np.arange(shard.size), starts)].all()
        for a, b in spans:
            if b - a <= T + 1:  # fits: some window holds all of it, from its start
                assert any(c <= a and b <= c + T + 1 for c in windows[s]), (a, b)
    # Reading cost: one epoch of aligned windows, against the split's tokens.
    assert rb.num_windows * T < 1.5 * d.num_tokens


def test_doc_aligned_batch_is_a_pure_function_of_seed_position_rank_and_world(story_dir):
    d = TokenData(story_dir, "train")

    def make(seed=3, rank=1, world=2):
        return RandomBatches(TokenData(story_dir, "train"), 4, 16, seed=seed, rank=rank, world_size=world,
                             doc_aligned=True)

    a = make()
    stream = [a.next_batch()[0] for _ in range(3 * a.batches_per_epoch)]  # three epochs
    for n in (0, 5, a.batches_per_epoch + 1, 3 * a.batches_per_epoch - 1, 2):
        assert torch.equal(make().batch_at(n)[0], stream[n])
    assert not torch.equal(make(seed=4).batch_at(0)[0], stream[0])
    ids_other_rank = {int(w) for n in range(a.batches_per_epoch) for w in make(rank=0).window_ids(n)}
    ids_this_rank = {int(w) for n in range(a.batches_per_epoch) for w in a.window_ids(n)}
    assert not ids_other_rank & ids_this_rank
    assert len(ids_other_rank | ids_this_rank) > a.num_windows - 8  # all but fewer than G windows per epoch
    plain = RandomBatches(d, 4, 16, seed=3, rank=1, world_size=2)
    assert not torch.equal(plain.batch_at(0)[0], stream[0])


def test_doc_aligned_state_is_saved_and_a_switch_is_refused(story_dir):
    d = TokenData(story_dir, "train")
    a = RandomBatches(d, 2, 16, seed=9, doc_aligned=True)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    assert state["doc_aligned"] is True
    b = RandomBatches(d, 2, 16, seed=9, doc_aligned=True)
    b.load_state_dict(state)
    assert torch.equal(b.next_batch()[0], a.next_batch()[0])
    plain = RandomBatches(d, 2, 16, seed=9)
    with pytest.raises(DataError, match=r"saved with --doc_aligned true; this one has --doc_aligned false"):
        plain.load_state_dict(state)
    old = {k: v for k, v in plain.state_dict().items() if k != "doc_aligned"}  # saved before the flag existed
    plain.load_state_dict(old)
    with pytest.raises(DataError, match=r"saved with --doc_aligned false; this one has --doc_aligned true"):
        b.load_state_dict(old)


def test_too_few_windows_for_batch_and_world_is_clear(tmp_path):
    d = TokenData(make_data_dir(tmp_path / "s", [16 * 10 + 1]), "train")  # 9 shifted windows of T = 16
    with pytest.raises(DataError, match=r"9 windows.*batch_size 4 x world_size 3 x accumulation 1 = 12"):
        RandomBatches(d, 4, 16, seed=0, world_size=3)
    with pytest.raises(DataError, match="fewer than batch_size 11"):
        next(val_batches(d, 11, 16))


def test_val_batches_sequential_disjoint_and_equal_per_rank(data_dir):
    d = TokenData(data_dir, "train")  # 325 windows of T = 16
    single = list(val_batches(d, 10, 16))
    assert len(single) == 32
    starts = [s for x, _ in single for s in window_starts(x)]
    assert starts == [w * 16 if w < 100 else 1601 + (w - 100) * 16 if w < 200 else 3202 + (w - 200) * 16
                      for w in range(320)]
    assert [torch.equal(a[0], b[0]) for a, b in zip(single, val_batches(d, 10, 16), strict=True)] == [True] * 32
    per_rank = [list(val_batches(d, 10, 16, rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in per_rank] == [10, 10, 10]
    got = [s for p in per_rank for x, _ in p for s in window_starts(x)]
    assert len(got) == len(set(got)) and set(got) <= set(starts)
    # max_batches takes the first batches of each rank: world 2 x 3 batches = world 1's first 6 batches.
    two = [list(val_batches(d, 10, 16, rank=r, world_size=2, max_batches=3)) for r in range(2)]
    assert sorted(s for p in two for x, _ in p for s in window_starts(x)) == starts[:60]
    x, y = single[0]
    assert x.shape == (10, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_bytes_per_token(data_dir):
    assert bytes_per_token(load_meta(data_dir), "train") == 4.0


# ---------------------------------------------------------------------------------------------
# Clear errors naming the file


def test_missing_meta_says_run_prepare_data(tmp_path):
    with pytest.raises(DataError, match="bin/prepare_data"):
        TokenData(tmp_path / "nowhere", "train")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="did not finish.*bin/prepare_data"):
        TokenData(tmp_path / "half", "train")


def test_truncated_shard_names_the_file(data_dir):
    path = data_dir / "train_000001.bin"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"train_000001\.bin.*truncated"):
        TokenData(data_dir, "train")
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError, match=r"train_000001\.bin.*header"):
        TokenData(data_dir, "train")


def test_wrong_magic_names_the_file(data_dir):
    path = data_dir / "train_000002.bin"
    raw = bytearray(path.read_bytes())
    raw[:8] = b"NOTSHARD"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_000002\.bin is not a StoryLlama token shard"):
        TokenData(data_dir, "train")


def test_missing_shard_and_count_mismatch(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "val_000000.bin").unlink()
    with pytest.raises(DataError, match=r"val_000000\.bin does not exist"):
        TokenData(data_dir, "val")
    meta["splits"]["train"]["shard_token_counts"][0] = 1600
    (data_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"train_000000\.bin holds 1,601 tokens, but meta.json says 1,600"):
        TokenData(data_dir, "train")


def test_dtype_must_fit_vocab(tmp_path):
    d = make_data_dir(tmp_path / "v", [100], vocab=70_000)  # uint16 shards cannot hold a 70,000 vocabulary
    with pytest.raises(DataError, match="uint32"):
        TokenData(d, "train")


def test_empty_split_and_unknown_split(tmp_path):
    d = make_data_dir(tmp_path / "z", [100], val_sizes=[])
    with pytest.raises(DataError, match="val split .* has no tokens"):
        TokenData(d, "val")
    with pytest.raises(DataError, match="no 'test' split"):
        TokenData(d, "test")


def test_shard_shorter_than_one_block(tmp_path):
    d = make_data_dir(tmp_path / "b", [300, 40])
    with pytest.raises(DataError, match=r"train_000001\.bin holds 40 tokens, fewer than one window .* 65"):
        TokenData(d, "train", block_size=64)
    with pytest.raises(DataError, match=r"train_000001\.bin"):
        RandomBatches(TokenData(d, "train"), 1, 64, seed=0)
    assert TokenData(d, "train", block_size=39).num_tokens == 340


def test_header_format_is_as_documented(data_dir):
    raw = (data_dir / "train_000000.bin").read_bytes()
    magic, version, itemsize, count = struct.unpack_from("<8sIIQ", raw)
    assert (magic, version, itemsize, count) == (b"SLTOKENS", 1, 2, 1601)
    assert len(raw) == HEADER_BYTES + 2 * 1601
    assert np.frombuffer(raw[HEADER_BYTES:], dtype="<u2")[:3].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# With a real prepared directory


def test_prepared_builtin_data_reads_back_as_stories(tmp_path):
    from storyllama.data_prep.prepare import PrepareOptions, prepare
    from storyllama.data_prep.tokenizer import load_encoding

    out = tmp_path / "builtin"
    prepare(PrepareOptions(out=out, builtin=True, builtin_stories=300, tokenizer="bpe:400", shard_tokens=20_000,
                           progress=False))
    train = TokenData(out, "train", block_size=64)
    val = TokenData(out, "val", block_size=64)
    assert train.vocab_size == 400 and len(train.shards) >= 2
    enc = load_encoding(out)
    x, y = RandomBatches(train, 4, 64, seed=1).next_batch()
    assert int(x.max()) < 400 and torch.equal(x[:, 1:], y[:, :-1])
    stream = np.concatenate([np.asarray(m) for m in train.shards])
    assert np.count_nonzero(stream == train.eot_id) == train.meta["splits"]["train"]["documents"]
    vx, _ = next(val_batches(val, 2, 64))
    assert enc.decode(vx[0].tolist()).split()[0] in {"Once", "One", "There", "In", "Far"}
    # bytes_per_token counts the documents' UTF-8 bytes (what decoding the stream gives back) per token.
    text_bytes = len(enc.decode_bytes([t for t in stream.tolist() if t != train.eot_id]))
    assert bytes_per_token(train.meta, "train") == pytest.approx(text_bytes / train.num_tokens)


def test_token_id_out_of_the_vocabulary_names_shard_id_and_vocabulary(tmp_path):
    d = tmp_path / "d"
    make_data_dir(d, [1601, 1601], [801], vocab=70_000)  # ids are positions < 3,202: all inside a vocab of 4,000
    meta = json.loads((d / "meta.json").read_text())
    meta["tokenizer"].update(vocab_size=4_000, eot_id=3_999)
    (d / "meta.json").write_text(json.dumps(meta))
    data = TokenData(d, "train")
    rb = RandomBatches(data, batch_size=4, block_size=16, seed=0)
    for position in range(rb.batches_per_epoch):  # every batch of a clean epoch is served
        rb.batch_at(position)
    shard = d / "train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES + 2 * 700 : HEADER_BYTES + 2 * 701] = struct.pack("<H", 4_321)  # token 700 of shard 1
    shard.write_bytes(bytes(raw))
    data = TokenData(d, "train")  # the header is fine: loading says nothing
    rb = RandomBatches(data, batch_size=4, block_size=16, seed=0)
    with pytest.raises(DataError, match=r"train_000001\.bin holds token id 4,321 \(at token 700\), outside the "
                                        r"vocabulary of 4,000"):
        for position in range(rb.batches_per_epoch):
            rb.batch_at(position)
    with pytest.raises(DataError, match="train_000001.bin holds token id 4,321"):  # the in-order pass checks too
        list(val_batches(data, 4, 16))
