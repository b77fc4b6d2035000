"""Seeded mutation fuzzers over every file type the tools read from disk (issue 30): a data directory's
meta.json and shard headers, a checkpoint's trainer_state.json and model.safetensors header, a run's
metrics.jsonl, a story-request JSONL source and an existing GGUF at --out (config.json has its own fuzzer in
tests/test_import_guards.py). Each mutation is handed to the tool that reads it, in process, and must end in:

- no exception out of the tool's main (what a user would see as a traceback), exit code 0 or 2;
- nothing written outside the tool's named output (every other file byte-identical);
- for run files: the run, repaired, still resumes (exit 0).

Checksums are refreshed after a mutation where the file has one, so the mutation reaches the parser behind the
checksum check (a lying file that was written whole, not only a flipped byte). A few mutations per file type run
in the suite; STORYLLAMA_FUZZ_ROUNDS=N runs N times as many (different seeds).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from storyllama import checkpoint
from storyllama.data_prep.prepare import main as prepare_main
from storyllama.data_prep.shards import HEADER_BYTES
from storyllama.export import main as export_main
from storyllama.sample import main as sample_main
from storyllama.train import main as train_main

ROUNDS = int(os.environ.get("STORYLLAMA_FUZZ_ROUNDS", "1"))
SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "32", "--batch_size", "2", "--eval_iters", "1", "--log_interval", "1",
         "--device", "cpu", "--sample_tokens", "0", "--eval_interval", "1000", "--max_time", "20"]
HOSTILE = [None, "x", "", -1, 0, 1.5, 10**12, 2**63, float("inf"), float("nan"), True, [], {}, "../../etc/passwd",
           [1, 2], {"a": 1}, "64", -(10**20)]


# -- mutation operators -------------------------------------------------------------------------------------
def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, containers included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, (*prefix, i))


def _set(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    node = obj
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


_DELETE = object()


def mutate_json(obj, rng: random.Random) -> bytes:
    """One hostile change: a value replaced by a hostile one, a key deleted, or the text itself cut, nested,
    made non-UTF-8 or non-JSON."""
    kind = rng.random()
    if kind < 0.7:
        paths = [p for p, _ in _paths(obj) if p]
        out = obj
        for path in rng.sample(paths, k=min(len(paths), rng.randint(1, 3))):
            try:
                out = _set(out, path, _DELETE if rng.random() < 0.2 else rng.choice(HOSTILE))
            except (KeyError, IndexError, TypeError):  # an earlier change removed the parent
                pass
        return json.dumps(out).encode()
    text = json.dumps(obj).encode()
    return rng.choice([
        lambda: text[: rng.randrange(len(text))],
        lambda: b"[" * 50_000 + b"]" * 50_000,
        lambda: text[:5] + b"\xff\xfe" + text[5:],
        lambda: b"",
        lambda: text + b"\n{garbage",
        lambda: json.dumps([obj]).encode(),
    ])()


def mutate_bytes(data: bytes, rng: random.Random, region: int) -> bytes:
    """Flip, zero or overwrite bytes within the first `region` bytes, or cut the file."""
    b = bytearray(data)
    choice = rng.random()
    if choice < 0.15:
        return bytes(b[: rng.randrange(min(len(b), region + 64))])
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(min(region, len(b)))
        b[i] = rng.choice([0, 0xFF, rng.randrange(256), b[i] ^ (1 << rng.randrange(8))])
    return bytes(b)


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.parents)}


def run_tool(main, argv, capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    except Exception as e:  # noqa: BLE001 - what a user would see as a traceback
        pytest.fail(f"{main.__module__}.main({argv}) raised {type(e).__name__}: {e}")
    err = capsys.readouterr().err
    return rc, err


def refresh_checksums(ckpt: Path) -> None:
    checkpoint.write_checksums(ckpt)


# -- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(builtin_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert train_main(["--data", str(builtin_data), "--out", str(run), *SHAPE, "--total_iters", "2"]) == 0
    return run


def cases(n: int, seed: int):
    for r in range(ROUNDS):
        rng = random.Random(seed + 7919 * r)
        for i in range(n):
            yield f"{r}_{i}", rng


# -- data directory: meta.json and shard headers -> bin/train ------------------------------------------------
def test_fuzzed_meta_json_and_shard_headers_stop_training_cleanly(builtin_data, tmp_path, capsys):
    meta = json.loads((builtin_data / "meta.json").read_text())
    shard = sorted(builtin_data.glob("train_*.bin"))[0].name
    outcomes = []
    for name, rng in cases(14, 11):
        w = tmp_path / name
        shutil.copytree(builtin_data, w / "data")
        if rng.random() < 0.65:
            (w / "data" / "meta.json").write_bytes(mutate_json(meta, rng))
        else:
            p = w / "data" / shard
            p.write_bytes(mutate_bytes(p.read_bytes(), rng, HEADER_BYTES))
        before = snapshot(w)
        rc, err = run_tool(train_main, ["--data", str(w / "data"), "--out", str(w / "run"), *SHAPE,
                                        "--total_iters", "1"], capsys)
        assert rc in (0, 2), err[-1500:]
        assert "Traceback" not in err
        assert snapshot(w, skip=w / "run") == before, "a file outside --out changed"
        outcomes.append(rc)
        shutil.rmtree(w)
    assert 2 in outcomes, "no mutation was refused: the fuzzer no longer reaches the readers"


# -- run files: trainer_state.json, model.safetensors' header, metrics.jsonl -> resume / sample / export -----
def _checkpoint_of(run: Path) -> Path:
    return checkpoint.resolve(run)


def test_fuzzed_trainer_state_and_safetensors_header_are_refused_or_used(finished_run, tmp_path, capsys):
    outcomes = []
    for name, rng in cases(16, 23):
        run = tmp_path / name / "run"
        shutil.copytree(finished_run, run)
        ckpt = _checkpoint_of(run)
        if rng.random() < 0.6:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            (ckpt / "trainer_state.json").write_bytes(mutate_json(state, rng))
            tool = "resume"  # the reader of trainer_state.json
        else:
            weights = ckpt / "model.safetensors"
            header_len = int.from_bytes(weights.read_bytes()[:8], "little") + 8
            weights.write_bytes(mutate_bytes(weights.read_bytes(), rng, header_len))
            tool = rng.choice(["sample", "export"])
        refresh_checksums(ckpt)
        outside = snapshot(tmp_path / name, skip=run)
        if tool == "resume":
            rc, err = run_tool(train_main, ["--data", str(_data_of(finished_run)), "--out", str(run), "--resume",
                                            "auto", *SHAPE, "--total_iters", "3"], capsys)
        elif tool == "sample":
            rc, err = run_tool(sample_main, ["--run", str(run), "--prompt", "Once", "--max_new_tokens", "4",
                                             "--seed", "1"], capsys)
        else:
            rc, err = run_tool(export_main, ["--run", str(run), "--out", str(tmp_path / name / "hf")], capsys)
        assert rc in (0, 2), (tool, err[-1500:])
        after = {k: v for k, v in snapshot(tmp_path / name, skip=run).items() if not k.startswith("hf")}
        assert after == outside, "a file outside the run changed"
        outcomes.append(rc)
        # repaired (the checkpoint's files put back), the run resumes
        shutil.rmtree(run)
        shutil.copytree(finished_run, run)
        shutil.rmtree(tmp_path / name)
    assert 2 in outcomes, "no mutation was refused: the fuzzer no longer reaches the readers"
    rc, err = run_tool(train_main, ["--data", str(_data_of(finished_run)), "--out", str(finished_run), "--resume",
                                    "auto", *SHAPE, "--total_iters", "2"], capsys)
    assert rc == 0, err[-1500:]


def _data_of(run: Path) -> Path:
    return Path(json.loads((run / "config.json").read_text())["train"]["data"])


def test_fuzzed_metrics_jsonl_never_stops_a_resume(finished_run, tmp_path, capsys):
    """metrics.jsonl is a log: whatever it holds, --resume auto goes on (torn or damaged records are skipped with
    a warning) and the loss plot and the studio's reader survive it."""
    from storyllama.metrics import plot_losses, read_records

    for name, rng in cases(6, 31):
        run = tmp_path / name / "run"
        shutil.copytree(finished_run, run)
        m = run / "metrics.jsonl"
        lines = m.read_bytes().splitlines(keepends=True)
        pick = rng.randrange(len(lines))
        try:
            rec = json.loads(lines[pick])
            lines[pick] = mutate_json(rec, rng).replace(b"\n", b" ") + b"\n"
        except ValueError:
            pass
        data = b"".join(lines)
        if rng.random() < 0.5:
            data = mutate_bytes(data, rng, len(data))
        m.write_bytes(data)
        read_records(m)
        plot_losses(m, tmp_path / name / "loss.png")
        rc, err = run_tool(train_main, ["--data", str(_data_of(finished_run)), "--out", str(run), "--resume", "auto",
                                        *SHAPE, "--total_iters", "3"], capsys)
        assert rc == 0, err[-1500:]
        shutil.rmtree(tmp_path / name)


# -- a story-request JSONL source -> bin/prepare_data --instruct ---------------------------------------------
def test_fuzzed_instruct_jsonl_is_refused_or_prepared(tmp_path, capsys):
    good = [{"words": ["kite", "rain"], "features": ["Dialogue"], "summary": "A girl flies a kite.",
             "story": "Once upon a time, a girl had a red kite. \"Look!\" she said. The rain came and went."}
            for _ in range(40)]
    outcomes = []
    for name, rng in cases(10, 41):
        w = tmp_path / name
        w.mkdir()
        recs = [json.dumps(r).encode() for r in good]
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(recs))
            recs[i] = mutate_json(good[i], rng).replace(b"\n", b" ")
        (w / "pairs.jsonl").write_bytes(b"\n".join(recs) + b"\n")
        before = snapshot(w)
        rc, err = run_tool(prepare_main, ["--instruct", "--train", str(w / "pairs.jsonl"), "--tokenizer", "bpe:300",
                                          "--out", str(w / "out"), "--num_proc", "1", "--no_progress"], capsys)
        assert rc in (0, 2), err[-1500:]
        assert "Traceback" not in err and "{'" not in err
        assert snapshot(w, skip=w / "out") == before
        outcomes.append(rc)
        shutil.rmtree(w)
    assert 2 in outcomes, "no mutation was refused: the fuzzer no longer reaches the readers"


@pytest.mark.parametrize("field,value", [("summary", {"x": 1}), ("request", ["a"]), ("words", 5),
                                         ("features", [{"a": 1}]), ("random_sentence", 3.5)])
def test_a_wrong_typed_request_field_is_refused_by_name(tmp_path, capsys, field, value):
    """A request field of the wrong type is one line naming the file, line and field, never a Python repr
    inside the training text."""
    rec = {"words": ["kite"], "story": "Once upon a time there was a kite.", field: value}
    ok = {"words": ["kite"], "story": "Once upon a time there was a kite."}
    (tmp_path / "pairs.jsonl").write_text("\n".join([json.dumps(ok)] * 5 + [json.dumps(rec)]) + "\n")
    rc, err = run_tool(prepare_main, ["--instruct", "--train", str(tmp_path / "pairs.jsonl"), "--tokenizer",
                                      "bpe:300", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "line 6" in err and repr(field) in err, err
    assert not (tmp_path / "out" / "meta.json").exists()


# -- an existing GGUF at --out -> bin/export --format gguf ---------------------------------------------------
def test_fuzzed_gguf_at_out_is_replaced_only_when_provably_ours(finished_run, tmp_path, capsys):
    pytest.importorskip("gguf", reason="gguf (llama.cpp's own package) is not installed")
    first = tmp_path / "first.gguf"
    assert export_main(["--run", str(finished_run), "--out", str(first), "--format", "gguf"]) == 0
    capsys.readouterr()
    original = first.read_bytes()
    outcomes = []
    for name, rng in cases(8, 53):
        w = tmp_path / name
        w.mkdir()
        out = w / "model.gguf"
        out.write_bytes(mutate_bytes(original, rng, 4096))
        shutil.copy2(first.with_suffix(".Modelfile"), w / "model.Modelfile")
        mutated = out.read_bytes()
        rc, err = run_tool(export_main, ["--run", str(finished_run), "--out", str(out), "--format", "gguf"], capsys)
        assert rc in (0, 2), err[-1500:]
        if rc == 2:  # refused: the file is left exactly as it was
            assert out.read_bytes() == mutated and "--out" in err
        outcomes.append(rc)
        shutil.rmtree(w)
    assert 2 in outcomes, "no mutated GGUF was refused"
