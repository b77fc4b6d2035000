"""bin/prepare_data and data_prep: sources, tokenizers, shards, meta.json, errors, interruption.

CPU only, no network: small built-in corpora in tmp_path; the shared TinyStories samples and GPT-2
ranks file are used when present (and the tests that need them skip with a reason when not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from storyllama.data_prep import builtin, encode, sources
from storyllama.data_prep.prepare import MARKER_FILE, PrepareError, PrepareOptions, main, prepare
from storyllama.data_prep.shards import HEADER_BYTES, PAUSE_ENV, PAUSE_TOKENIZE_ENV, open_shard, read_header
from storyllama.data_prep.tokenizer import (
    EOT,
    GPT2_PAT_STR,
    TokenizerError,
    check_ranks,
    dump_ranks,
    gpt2_ranks,
    load_encoding,
    load_ranks,
    make_encoding,
    train_bpe,
)

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
GPT2_FILE = SHARED / "gpt2.tiktoken"
TS_TRAIN_JSONL = SHARED / "tinystories" / "train-sample.jsonl"
TS_TRAIN_TXT = SHARED / "tinystories" / "train-sample.txt"
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.is_file(), reason=f"GPT-2 ranks file {GPT2_FILE} is absent")
needs_ts = pytest.mark.skipif(not (TS_TRAIN_JSONL.is_file() and TS_TRAIN_TXT.is_file()),
                              reason=f"TinyStories samples under {SHARED / 'tinystories'} are absent")

UNICODE = ["Café naïve résumé, señor Müller — «quotes» and ‘curly’ ones…",
           "Emoji: 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵, skin tones 👍🏽",
           "中文故事：从前有一只小兔子。日本語のひらがなとカタカナ。한국어 문장.",
           "Control chars \x00\x01\x07\x1b[0m tabs\tand\r\nnewlines\n\nform\x0cfeed\u200b zero-width\ufeff",
           "Combining e\u0301 vs \u00e9, RTL \u202eevil\u202c, math ∑∫√∞ ≠ ≤, astral \U0001d54f \U0010ffff",
           "A story that mentions <|endoftext|> in its text must keep it as plain text."]


@pytest.fixture(autouse=True)
def _no_tiktoken_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader would cache local files by path


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return builtin.write_stories(400, seed=7)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return path


def run_prepare(out: Path, *, progress=False, **kw) -> dict:
    return prepare(PrepareOptions(out=out, progress=progress, **kw))


def shard_tokens(out: Path, split: str) -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.concatenate([np.asarray(open_shard(out / name)) for name in meta["splits"][split]["shards"]])


def split_docs(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    assert tokens.size and tokens[-1] == eot, "the stream must end with EOT"
    cuts = np.nonzero(tokens == eot)[0]
    return np.split(tokens, cuts + 1)[:-1]


def dir_snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


# ---------------------------------------------------------------------------------------------
# Round trip and the output contract


def test_round_trip_documents_each_followed_by_eot(tmp_path, stories):
    train_docs = stories[:300] + UNICODE
    val_docs = stories[300:]
    train = write_jsonl(tmp_path / "train.jsonl", train_docs)
    val = write_txt(tmp_path / "val.txt", val_docs)
    out = tmp_path / "out"
    meta = run_prepare(out, train=[str(train)], val=[str(val)], tokenizer="bpe:600", shard_tokens=3000, num_proc=2)

    enc = load_encoding(out)
    assert enc.n_vocab == 600 and enc.eot_token == 599 == meta["tokenizer"]["eot_id"]
    assert meta["tokenizer"]["vocab_size"] == 600 and meta["tokenizer"]["pat_str"] == GPT2_PAT_STR
    for split, docs in (("train", train_docs), ("val", val_docs)):
        info = meta["splits"][split]
        tokens = shard_tokens(out, split)
        pieces = split_docs(tokens, enc.eot_token)
        assert [enc.decode(p[:-1].tolist()) for p in pieces] == [d.strip() for d in docs]
        # Same ids as tiktoken itself gives for each document, EOT after each.
        expected = np.concatenate([np.array(enc.encode_ordinary(d.strip()) + [enc.eot_token]) for d in docs])
        np.testing.assert_array_equal(tokens, expected)
        assert info["tokens"] == tokens.size and info["documents"] == len(docs)
        assert info["bytes"] == sum(len(d.strip().encode("utf-8")) for d in docs)
        counts = [read_header(out / name)[1] for name in info["shards"]]
        assert counts == info["shard_token_counts"]
        assert all(c == 3000 for c in counts[:-1]) and 3000 <= counts[-1] < 6000 or len(counts) == 1
    assert len(meta["splits"]["train"]["shards"]) > 1  # the shard cutting was exercised
    assert read_header(out / "train_000000.bin")[0] == np.dtype("<u2")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta.json", "tokenizer.tiktoken", *meta["splits"]["train"]["shards"], *meta["splits"]["val"]["shards"]])


def test_meta_records_source_and_options(tmp_path, stories):
    train = write_jsonl(tmp_path / "t.jsonl", stories[:100])
    meta = run_prepare(tmp_path / "o", train=[str(train)], tokenizer="bpe:400", val_fraction=0.1, seed=3)
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16"
    assert meta["source"] == {"kind": "files", "val": None,
                              "train": [{"path": str(train.resolve()), "bytes": train.stat().st_size}]}
    assert meta["options"]["val_fraction"] == 0.1 and meta["options"]["seed"] == 3
    assert meta["options"]["tokenizer"] == "bpe:400" and meta["options"]["shard_tokens"] > 0
    assert meta["splits"]["val"]["documents"] == 10 and meta["splits"]["train"]["documents"] == 90
    assert json.loads((tmp_path / "o" / "meta.json").read_text()) == meta
    from storyllama.data_prep.tokenizer import file_sha256
    assert meta["tokenizer"]["sha256"] == file_sha256(tmp_path / "o" / "tokenizer.tiktoken")


@needs_gpt2
def test_gpt2_ids_match_tiktoken(tmp_path, stories):
    ranks = gpt2_ranks(GPT2_FILE)
    enc = make_encoding("gpt2", ranks)
    assert enc.encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257

    # An encoding built only from tiktoken's own loader and GPT-2 pattern gives the same shard ids.
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str
    ref = tiktoken.Encoding("ref", pat_str=r50k_pat_str, mergeable_ranks=load_tiktoken_bpe(str(GPT2_FILE)),
                            special_tokens={EOT: 50256})
    docs = stories[:50] + UNICODE
    out = tmp_path / "g"
    meta = run_prepare(out, train=[str(write_jsonl(tmp_path / "t.jsonl", docs))],
                       val=[str(write_jsonl(tmp_path / "v.jsonl", stories[50:60]))],
                       tokenizer="gpt2", tokenizer_file=str(GPT2_FILE))
    expected = [t for d in docs for t in ref.encode_ordinary(d.strip()) + [50256]]
    assert shard_tokens(out, "train").tolist() == expected
    assert meta["tokenizer"]["name"] == "gpt2" and meta["tokenizer"]["vocab_size"] == 50257
    # tokenizer.tiktoken is written for gpt2 too, and tiktoken reads it back as the same ranks.
    assert load_tiktoken_bpe(str(out / "tokenizer.tiktoken")) == load_tiktoken_bpe(str(GPT2_FILE))
    assert load_encoding(out).encode_ordinary("Once upon a time") == [7454, 2402, 257, 640]


def test_gpt2_without_file_or_network_says_use_tokenizer_file(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="--tokenizer_file"):
        gpt2_ranks(None)


def test_gpt2_file_must_be_gpt2(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    dump_ranks(ranks, tmp_path / "small.tiktoken")
    with pytest.raises(TokenizerError, match="50,256"):
        gpt2_ranks(tmp_path / "small.tiktoken")


# ---------------------------------------------------------------------------------------------
# The trained BPE


def test_bpe_deterministic_and_round_trips_any_unicode(stories):
    texts = stories[:200] + UNICODE
    a, b = train_bpe(iter(texts), 700), train_bpe(list(texts), 700)
    assert a == b and len(a) == 699
    enc = make_encoding("bpe:700", a)
    assert enc.n_vocab == 700 and enc.eot_token == 699
    samples = UNICODE + ["".join(chr(c) for c in range(0, 0x250)), "\U0001f600" * 5, " leading and trailing  ",
                         "x" * 1000, "", "\n\n\n", "🦙 mixed ASCII and 中文 and é\u0301"]
    for s in samples:
        ids = enc.encode_ordinary(s)
        assert enc.decode(ids) == s
        assert max(ids, default=0) < 699  # never the EOT id for ordinary text
    long_words = sum(1 for t in a if len(t) >= 4)
    assert long_words > 100  # it learnt real merges, not just bytes


def test_bpe_ranks_tokenize_like_the_trainer(stories):
    """The conversion to tiktoken ranks keeps the Hugging Face tokenizer's own segmentation."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from storyllama.data_prep.hf_tokenizer import byte_level_chars

    train, held_out = stories[:300], stories[300:]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GPT2_PAT_STR), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.train_from_iterator(train, trainers.BpeTrainer(vocab_size=799, show_progress=False, special_tokens=[],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    enc = make_encoding("bpe:800", train_bpe(train, 800))
    chars = byte_level_chars()
    for doc in held_out:
        hf_pieces = [bytes(chars[c] for c in tok) for tok in hf.encode(doc).tokens]
        assert [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(doc)] == hf_pieces


def test_bpe_too_large_for_the_text_is_a_clear_error():
    with pytest.raises(TokenizerError, match="smaller bpe:N"):
        train_bpe(["tiny text"], 4096)


@pytest.mark.parametrize("docs", [
    ["plain story one.", "two  ", "", " three\n\n"],  # the whole-chunk fast path
    UNICODE,  # one story holds "<|endoftext|>" as text: the per-document path
    ["ends with <|endoftext|", "|> starts oddly", "<<|endoftext|>>", "x<|endoftext|>"],
])
def test_encode_chunk_equals_encode_ordinary_per_document(docs):
    enc = make_encoding("b", train_bpe(builtin.write_stories(50, 0), 400))
    chunk = encode.encode_chunk(enc, docs, np.dtype("<u2"))
    expected = [t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]]
    assert chunk.tokens.tolist() == expected and chunk.documents == len(docs)
    assert chunk.bytes == sum(len(d.encode()) for d in docs) and chunk.tokens.dtype == np.dtype("<u2")
    assert encode.encode_chunk_per_document(enc, docs, np.dtype("<u2")).tokens.tolist() == expected


def test_lone_surrogate_is_replaced_not_fatal():
    enc = make_encoding("b", {bytes([b]): b for b in range(256)})
    chunk = encode.encode_chunk(enc, ["ok", "bad \ud800 half"], np.dtype("<u2"))
    assert enc.decode(chunk.tokens.tolist()) == "ok<|endoftext|>bad ? half<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Workers


def test_one_and_two_workers_give_byte_identical_shards(tmp_path, stories, monkeypatch):
    monkeypatch.setattr(encode, "CHUNK_CHARS", 4000)  # many chunks, so the workers interleave
    train = write_jsonl(tmp_path / "t.jsonl", stories)
    outs = []
    for n in (1, 2, 3):
        out = tmp_path / f"w{n}"
        run_prepare(out, train=[str(train)], tokenizer="bpe:500", shard_tokens=5000, num_proc=n)
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert len([f for f in files if f.endswith(".bin")]) > 3
    for other in outs[1:]:
        assert sorted(p.name for p in other.iterdir()) == files
        for name in files:
            assert (other / name).read_bytes() == (outs[0] / name).read_bytes(), name


def test_encode_documents_order_for_any_chunking():
    enc = make_encoding("b", {bytes([b]): b for b in range(256)})
    docs = [f"doc {i} " + "é" * (i % 7) for i in range(200)]
    ref = encode.encode_chunk(enc, docs, np.dtype("<u2")).tokens
    for num_proc, chunk_chars in ((1, 10), (2, 10), (4, 37), (2, 10**9)):
        got = np.concatenate([c.tokens for c in encode.encode_documents(enc, iter(docs), np.dtype("<u2"),
                                                                         num_proc, chunk_chars)])
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------
# Sources


def test_txt_jsonl_json_parquet_read_the_same_stories(tmp_path, stories):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = stories[:50] + UNICODE[:-1]  # (a .txt cannot hold a story with an <|endoftext|> line; others can)
    paths = [write_txt(tmp_path / "s.txt", docs), write_jsonl(tmp_path / "s.jsonl", docs)]
    (tmp_path / "s.json").write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)]))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), tmp_path / "s.parquet", row_group_size=7)
    paths += [tmp_path / "s.json", tmp_path / "s.parquet"]
    expected = [d.strip() for d in docs]
    for p in paths:
        assert list(sources.file_source([p]).documents()) == expected, p.suffix
    # Several files are read in order, as one stream.
    assert list(sources.file_source(paths[:2]).documents()) == expected * 2


@needs_ts
def test_shared_txt_and_jsonl_samples_hold_the_same_stories():
    a = list(sources.file_source([TS_TRAIN_TXT]).documents())
    b = list(sources.file_source([TS_TRAIN_JSONL]).documents())
    assert len(a) == len(b) > 1000 and a == b


def test_val_fraction_is_exact_seeded_and_disjoint(stories):
    whole = sources.list_source(stories, {})
    train, val = sources.split_off(whole, 0.1, seed=5)
    t, v = list(train.documents()), list(val.documents())
    assert len(v) == 40 and len(t) == 360
    assert sorted(t + v) == sorted(stories)
    assert [d for d in stories if d in set(v)] == v  # source order kept
    assert list(sources.split_off(whole, 0.1, seed=5)[1].documents()) == v
    assert list(sources.split_off(whole, 0.1, seed=6)[1].documents()) != v


def test_huggingface_dataset_train_and_validation_splits(tmp_path, monkeypatch, stories):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": stories[:30]}),
                               "validation": datasets.Dataset.from_dict({"text": stories[30:40]})})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or dd)
    meta = run_prepare(tmp_path / "hf", dataset="roneneldan/TinyStories", tokenizer="bpe:300")
    assert asked == ["roneneldan/TinyStories"]
    assert meta["source"] == {"kind": "huggingface", "dataset": "roneneldan/TinyStories"}
    assert meta["splits"]["train"]["documents"] == 30 and meta["splits"]["val"]["documents"] == 10
    enc = load_encoding(tmp_path / "hf")
    val = split_docs(shard_tokens(tmp_path / "hf", "val"), enc.eot_token)
    assert [enc.decode(p[:-1].tolist()) for p in val] == stories[30:40]


def test_builtin_stories_deterministic_and_varied():
    a = builtin.write_stories(300, seed=1)
    assert a == builtin.write_stories(300, seed=1)
    assert a != builtin.write_stories(300, seed=2)
    assert builtin.write_story(1, 123) == a[123]
    assert len(set(a)) == 300
    assert sum('"' in s for s in a) > 250  # dialogue
    openings = {s.split(",")[0] for s in a}
    assert len(openings) > 20
    words = {w for s in a for w in s.split()}
    assert len(words) > 800  # an open vocabulary (invented names) for a BPE to learn
    assert 300 < np.mean([len(s) for s in a]) < 1500


def test_builtin_default_size_supports_bpe_4096(tmp_path):
    meta = run_prepare(tmp_path / "b", builtin=True, tokenizer="bpe:4096")
    assert meta["tokenizer"]["vocab_size"] == 4096
    text_mb = (meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]) / 1e6
    assert 2.0 < text_mb < 5.0
    assert meta["source"]["kind"] == "builtin" and meta["splits"]["val"]["documents"] > 0


# ---------------------------------------------------------------------------------------------
# Re-runs and refusals: nothing written or overwritten


def test_rerun_same_command_does_nothing(tmp_path, stories, caplog):
    train = write_jsonl(tmp_path / "t.jsonl", stories[:80])
    out = tmp_path / "o"
    first = run_prepare(out, train=[str(train)], tokenizer="bpe:300")
    before = dir_snapshot(out)
    caplog.set_level("INFO", logger="data_prep")
    assert run_prepare(out, train=[str(train)], tokenizer="bpe:300", num_proc=1) == first
    assert "already complete" in caplog.text
    assert dir_snapshot(out) == before


def test_rerun_on_a_damaged_output_refuses(tmp_path, stories):
    train = write_jsonl(tmp_path / "t.jsonl", stories[:80])
    out = tmp_path / "o"
    run_prepare(out, train=[str(train)], tokenizer="bpe:300")
    shard = out / "val_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(PrepareError, match=r"damaged .*val_000000\.bin.*truncated"):
        run_prepare(out, train=[str(train)], tokenizer="bpe:300")


@pytest.mark.parametrize("change", [dict(tokenizer="bpe:400"), dict(val_fraction=0.2), dict(shard_tokens=1999),
                                    dict(other_source=True)])
def test_different_tokenizer_or_source_refused_without_overwrite(tmp_path, stories, change):
    train = write_jsonl(tmp_path / "t.jsonl", stories[:80])
    out = tmp_path / "o"
    run_prepare(out, train=[str(train)], tokenizer="bpe:300")
    before = dir_snapshot(out)
    kw = dict(train=[str(train)], tokenizer="bpe:300")
    if change.pop("other_source", False):
        kw["train"] = [str(write_jsonl(tmp_path / "u.jsonl", stories[80:160]))]
    kw.update(change)
    with pytest.raises(PrepareError, match="already holds data prepared differently"):
        run_prepare(out, **kw)
    assert dir_snapshot(out) == before


def test_foreign_nonempty_output_refused(tmp_path, stories):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PrepareError, match="not empty"):
        run_prepare(out, builtin=True, builtin_stories=50, tokenizer="bpe:300")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bin" / "prepare_data"), "--no_progress", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing_file", "empty_txt", "empty_jsonl", "vocab_too_big", "bad_tokenizer",
                                  "unknown_format", "no_source", "bad_json", "val_fraction_nan", "bpe_train_mb_inf",
                                  "num_proc_0", "shard_tokens_1", "shard_tokens_word", "seed_negative", "unknown_flag",
                                  "train_is_a_directory"])
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, case):
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("\n<|endoftext|>\n   \n<|endoftext|>\n")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", ["One story.", "Another story."])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "x.csv").write_text("text\nhello\n")
    args, message = {
        "missing_file": (["--train", str(tmp_path / "nope.jsonl")], "no such file"),
        "empty_txt": (["--train", str(good), "--val", str(empty_txt)], "holds no documents"),
        "empty_jsonl": (["--train", str(empty_jsonl)], "holds no documents"),
        "vocab_too_big": (["--builtin", "--tokenizer", "bpe:70000"], "65,536"),
        "bad_tokenizer": (["--builtin", "--tokenizer", "sentencepiece"], "gpt2' or 'bpe:N'"),
        "unknown_format": (["--train", str(tmp_path / "x.csv")], "unknown format"),
        "no_source": ([], "exactly one source"),
        "bad_json": (["--train", str(bad_json), "--tokenizer", "bpe:300"], "line 2 is not JSON"),
        "val_fraction_nan": (["--builtin", "--val_fraction", "nan"],
                             "--val_fraction must be a finite number in (0, 1), got nan"),
        "bpe_train_mb_inf": (["--builtin", "--tokenizer", "bpe:300", "--bpe_train_mb", "inf"],
                             "--bpe_train_mb must be a finite number in (0, 100,000]"),
        "num_proc_0": (["--builtin", "--num_proc", "0"], "--num_proc must be a whole number in [1, 1,024], got 0"),
        "shard_tokens_1": (["--builtin", "--shard_tokens", "1"], "shards hold at least 1,024 tokens"),
        "shard_tokens_word": (["--builtin", "--shard_tokens", "many"], "argument --shard_tokens: invalid int value"),
        "seed_negative": (["--builtin", "--seed", "-5"], "--seed must be a whole number in [0, "),
        "builtin_stories_huge": (["--builtin", "--builtin_stories", "100000000000000000000"],
                                 "--builtin_stories must be a whole number in [2, 10,000,000]"),
        "unknown_flag": (["--builtin", "--vocab", "300"], "unrecognized arguments: --vocab"),
        "train_is_a_directory": (["--train", str(tmp_path)], "is a directory"),
    }[case]
    out = tmp_path / "new" / "out"
    r = _cli([*args, "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bin/prepare_data: error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()  # not even the directories it would have made


def test_ranks_over_uint16_refused(tmp_path):
    big = {bytes([b]): b for b in range(256)}
    big.update({b"\xf8" + i.to_bytes(3, "big"): 256 + i for i in range(65_536 - 256)})  # 65,536 ranks + EOT
    with pytest.raises(TokenizerError, match="65,536"):
        check_ranks(big, "big")
    dump_ranks(big, tmp_path / "big.tiktoken")
    with pytest.raises(TokenizerError, match="uint16"):
        load_ranks(tmp_path / "big.tiktoken")


def test_load_encoding_refuses_a_tokenizer_that_is_not_the_data_s(tmp_path, stories):
    train = write_jsonl(tmp_path / "t.jsonl", stories[:60])
    a, b = tmp_path / "a", tmp_path / "b"
    run_prepare(a, train=[str(train)], tokenizer="bpe:300")
    run_prepare(b, train=[str(train)], tokenizer="bpe:400")
    (a / "tokenizer.tiktoken").write_bytes((b / "tokenizer.tiktoken").read_bytes())
    with pytest.raises(TokenizerError, match="does not match"):
        load_encoding(a)
    with pytest.raises(TokenizerError, match="no meta.json"):
        load_encoding(tmp_path)
    # Any directory holding the two files works (a run directory, say).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("meta.json", "tokenizer.tiktoken"):
        (run_dir / name).write_bytes((b / name).read_bytes())
    assert load_encoding(run_dir).n_vocab == 400


# ---------------------------------------------------------------------------------------------
# Interruption


def test_killed_while_writing_leaves_no_whole_shard_and_next_run_finishes(tmp_path):
    out = tmp_path / "out"
    args = ["--builtin", "--builtin_stories", "200", "--tokenizer", "bpe:300", "--shard_tokens", "20000",
            "--out", str(out)]
    env = {**os.environ, PAUSE_ENV: "60"}
    proc = subprocess.Popen([sys.executable, str(REPO / "bin" / "prepare_data"), "--no_progress", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tmp_shard = out / "train_000000.bin.tmp"
    try:
        deadline = time.monotonic() + 60
        while not (tmp_shard.exists() and tmp_shard.stat().st_size > HEADER_BYTES):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the run never reached the shard write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # killed half way through writing the first shard
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert not (out / "meta.json").exists()
    assert not list(out.glob("*.bin"))  # no shard with a final name
    assert (out / MARKER_FILE).exists() and tmp_shard.exists()

    assert main(["--no_progress", *args]) == 0  # the same command finishes the job
    assert not list(out.glob("*.tmp")) and not (out / MARKER_FILE).exists()
    ref = tmp_path / "ref"
    assert main(["--no_progress", *args[:-1], str(ref)]) == 0
    assert dir_snapshot_bytes(out) == dir_snapshot_bytes(ref)


def dir_snapshot_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_failed_run_removes_what_it_wrote(tmp_path, stories):
    src = write_jsonl(tmp_path / "t.jsonl", stories[:50])
    with open(src, "a") as f:
        f.write("{broken\n")  # found only when tokenizing reaches it, after writing began
    ranks_file = tmp_path / "r.tiktoken"
    dump_ranks(train_bpe(stories[:50], 300), ranks_file)  # a reused BPE: no training pass reads the file first
    out = tmp_path / "o"
    with pytest.raises(sources.SourceError, match="line 51 is not JSON"):
        run_prepare(out, train=[str(src)], tokenizer="bpe:300", tokenizer_file=str(ranks_file),
                    val=[str(write_jsonl(tmp_path / "v.jsonl", stories[50:60]))])
    assert not out.exists()


def test_cli_bin_runs_from_repo_root(tmp_path):
    out = tmp_path / "cli"
    r = _cli(["--builtin", "--builtin_stories", "60", "--tokenizer", "bpe:300", "--out", str(out)], cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (out / "meta.json").is_file() and "done in" in r.stderr
    r = _cli(["--builtin", "--builtin_stories", "60", "--tokenizer", "bpe:300", "--out", str(out)], cwd=REPO)
    assert r.returncode == 0 and "already complete" in r.stderr


# ---------------------------------------------------------------------------------------------
# Faults injected for real: a second run on the same --out, Ctrl-C, a full disk (issue 15)

SMALL = ["--builtin", "--builtin_stories", "200", "--tokenizer", "bpe:300", "--shard_tokens", "20000"]


def _start(args: list[str], **env: str) -> subprocess.Popen:
    # SIGINT at its default in the child, as in a terminal: pytest started as a background job (`make test &`)
    # has it ignored, and an ignored SIGINT is inherited, so the Ctrl-C tests would wait for nothing
    return subprocess.Popen([sys.executable, str(REPO / "bin" / "prepare_data"), "--no_progress", *args], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > HEADER_BYTES):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path.name}: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _last_line_only(stderr: str) -> str:
    """The error line: stderr's last line; no traceback; no other line is an error (log lines may precede)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and "Traceback" not in stderr, stderr
    assert sum("error" in ln or "interrupted" in ln for ln in lines) == 1, stderr
    return lines[-1]


def test_second_run_on_the_same_out_is_refused_and_the_first_finishes_whole(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    first = _start([*SMALL, "--out", str(out)], **{PAUSE_ENV: f"@{go}"})  # holds in its first shard until `go`
    try:
        _wait_for(out / "train_000000.bin.tmp", first)
        for other in ([*SMALL, "--out", str(out)], [*SMALL[:-3], "bpe:400", "--out", str(out)]):  # same / other data
            r = _cli(other, cwd=REPO)
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr  # refused before a log line
            line = _last_line_only(r.stderr)
            assert f"in use by another bin/prepare_data (pid {first.pid}" in line and str(out) in line, r.stderr
        go.touch()
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    ref = tmp_path / "ref"
    assert main(["--no_progress", *SMALL, "--out", str(ref)]) == 0
    assert dir_snapshot_bytes(out) == dir_snapshot_bytes(ref)  # whole, and no lock file left behind
    assert ".storyllama.lock" not in dir_snapshot_bytes(out)


def test_a_failed_run_never_deletes_a_finished_output_of_other_data(tmp_path):
    out = tmp_path / "out"
    assert main(["--no_progress", *SMALL, "--out", str(out)]) == 0
    before = dir_snapshot(out)
    r = _cli([*SMALL[:-3], "bpe:400", "--out", str(out)], cwd=REPO)
    assert r.returncode == 2 and "already holds data prepared differently" in _last_line_only(r.stderr)
    assert dir_snapshot(out) == before


def test_an_output_holding_only_a_dead_run_s_lock_file_is_ours(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".storyllama.lock").write_text('{"tool": "bin/prepare_data", "pid": 1, "started": 0}')  # nobody holds it
    assert main(["--no_progress", *SMALL, "--out", str(out)]) == 0
    assert (out / "meta.json").is_file() and not (out / ".storyllama.lock").exists()


@pytest.mark.parametrize("when", ["writing", "early"])
def test_ctrl_c_is_one_line_exit_2_keeps_nothing_unfinished_and_the_rerun_finishes(tmp_path, when):
    out = tmp_path / "out"
    args = [*SMALL, "--out", str(out)]
    if when == "writing":  # half way through the first shard
        proc = _start(args, **{PAUSE_ENV: f"@{tmp_path / 'never'}"})
        _wait_for(out / "train_000000.bin.tmp", proc)
    else:  # as soon as the lock is taken: making stories, training the BPE or tokenizing
        proc = _start(args)
        deadline = time.monotonic() + 60
        while not (out / ".storyllama.lock").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if when == "early" and proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 2, err
    assert "interrupted" in _last_line_only(err) and "run the same command again" in err
    assert not out.exists()  # it made the directory, and it removed it with everything in it

    assert main(["--no_progress", *args]) == 0  # the same command finishes the job
    ref = tmp_path / "ref"
    assert main(["--no_progress", *args[:-1], str(ref)]) == 0
    assert dir_snapshot_bytes(out) == dir_snapshot_bytes(ref)


def test_ctrl_c_while_tokenizing_stops_without_waiting_for_the_queue(tmp_path):
    out, go = tmp_path / "out", tmp_path / "go"
    args = [*SMALL, "--num_proc", "2", "--out", str(out)]
    proc = _start(args, **{PAUSE_TOKENIZE_ENV: f"@{go}"})  # a tokenizer worker holds its chunk until `go`
    deadline = time.monotonic() + 120
    while not (tmp_path / "go.waiting").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    proc.send_signal(signal.SIGINT)  # the main thread is waiting for that chunk
    try:
        deadline = time.monotonic() + 30
        while not any("interrupted" in ln for ln in lines):  # said, and cleaned up, while the worker still holds
            assert time.monotonic() < deadline, f"no word 30 s after Ctrl-C: {lines}"
            time.sleep(0.05)
        assert not out.exists()
    finally:
        go.touch()  # the worker finishes its chunk; nothing waits for the queued ones
    proc.wait(timeout=60)
    reader.join(timeout=10)
    assert proc.returncode == 2 and "interrupted" in _last_line_only("".join(lines))
    assert main(["--no_progress", *args]) == 0
    assert (out / "meta.json").is_file()


def test_ctrl_c_keeps_the_user_s_directory_and_a_dead_run_s_leftovers_go(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # the user's, empty
    proc = _start([*SMALL, "--out", str(out)], **{PAUSE_ENV: f"@{tmp_path / 'never'}"})
    _wait_for(out / "train_000000.bin.tmp", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "interrupted" in _last_line_only(err)
    assert out.is_dir() and not list(out.iterdir())


def _mount_small_disk(mnt: Path, size_kb: int) -> None:
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk for real: {r.stderr.decode().strip()}")


def test_full_disk_is_one_line_naming_the_file_exit_2_and_removes_what_it_wrote(tmp_path):
    mnt = tmp_path / "small_disk"
    _mount_small_disk(mnt, 200)  # the shards need ~330 KB
    try:
        (mnt / "mine.txt").write_text("the user's")
        out = mnt / "out"
        r = _cli(["--builtin", "--builtin_stories", "600", "--tokenizer", "bpe:300", "--out", str(out)], cwd=REPO)
        assert r.returncode == 2, r.stderr
        line = _last_line_only(r.stderr)
        assert "No space left on device" in line and str(out / "train_000000.bin.tmp") in line, line
        assert not out.exists() and (mnt / "mine.txt").read_text() == "the user's"
    finally:
        subprocess.run(["umount", str(mnt)])


def test_an_error_that_is_not_the_disk_does_not_blame_the_disk(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    r = _cli([*SMALL, "--out", str(blocker / "out")], cwd=REPO)
    assert r.returncode == 2, r.stderr
    line = _last_line_only(r.stderr)
    assert "Not a directory" in line and str(blocker / "out") in line and "space" not in line, line
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("how", ["read_only_file_system", "no_permission"])
def test_an_unwritable_out_is_one_line_naming_it_and_not_a_disk_full(tmp_path, how):
    parent = tmp_path / "parent"
    if how == "read_only_file_system":
        parent.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(parent)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
        expected = "Read-only file system"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes through any permission bits")
        parent.mkdir(mode=0o500)
        expected = "Permission denied"
    try:
        r = _cli([*SMALL, "--out", str(parent / "out")], cwd=REPO)
    finally:
        if how == "read_only_file_system":
            subprocess.run(["umount", str(parent)])
    assert r.returncode == 2, r.stderr
    line = _last_line_only(r.stderr)
    assert expected in line and str(parent / "out") in line and "space" not in line, line


def test_help_says_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("default 6,000", "default 0.05", "default gpt2", "default 200)", "default: all cores",
                    "default 50,000,000", "default 1337"):
        assert text.count(default) == 1, default
    assert "at least 1,024" in text
