"""Run files that lie (issue 30, class 1): a torn metrics record, a `latest` that points outside the run or is
gone, a checkpoint without checksums, a meta.json with a bad field. Each case is a row: how the file is made
to lie, what the tool must do, and what must be unchanged on disk afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storyllama import checkpoint
from storyllama.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--preset", "tiny", "--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1",
         "--hidden_dim", "64", "--block_size", "32", "--eval_iters", "1", "--log_interval", "1", "--batch_size", "2",
         "--device", "cpu", "--sample_tokens", "0", "--eval_interval", "2", "--save_interval", "2"]


def train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bin/train", "--data", str(data), "--out", str(out), *SHAPE, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(builtin_data, tmp_path_factory):
    """Two finished runs of 4 steps (checkpoints at steps 2 and 4): `a` is lied to, `b` is the other run."""
    base = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        assert train_main(["--data", str(builtin_data), "--out", str(base / name), *SHAPE, "--total_iters", "4",
                           "--seed", str(1 + (name == "b"))]) == 0
    return builtin_data, base


@pytest.fixture
def runs(finished, tmp_path):
    data, base = finished
    shutil.copytree(base / "a", tmp_path / "a")
    shutil.copytree(base / "b", tmp_path / "b")
    return data, tmp_path / "a", tmp_path / "b"


def test_a_torn_metrics_record_is_skipped_and_the_run_resumes(runs):
    data, a, _ = runs
    with open(a / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill mid-append
    res = train(data, a, "--resume", "auto", "--total_iters", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "torn record" in res.stderr and "metrics.jsonl" in res.stderr
    lines = (a / "metrics.jsonl").read_text().splitlines()
    bad = [ln for ln in lines if not ln.startswith("{") or not ln.endswith("}")]
    assert bad == ['{"step": 5, "lo'], bad  # the torn line stays one line; every other is a whole record
    assert max(json.loads(ln)["step"] for ln in lines if ln not in bad) == 6
    assert (a / "loss.png").is_file()


@pytest.mark.parametrize("pointer", ["../../b/checkpoints/step_000004", "ABS", "step_000004/../../../b", "",
                                     "step_000099", "\x00\xff garbage"])
def test_latest_is_resolved_inside_the_run_only(runs, pointer, caplog):
    data, a, b = runs
    if pointer == "ABS":
        pointer = str(b / "checkpoints" / "step_000004")
    (a / "checkpoints" / "latest").write_text(pointer + "\n", errors="surrogateescape")
    before_b = snapshot(b)
    ckpt = checkpoint.resolve(a)
    assert ckpt == a / "checkpoints" / "step_000004"  # this run's newest that verifies, never b's
    if pointer != str(b / "checkpoints" / "step_000004"):
        return  # the tools, once: they all resolve through checkpoint.resolve
    res = subprocess.run([sys.executable, "bin/sample", "--run", str(a), "--prompt", "Once", "--max_new_tokens", "3",
                          "--temperature", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "step_000004" in res.stderr, res.stderr[-2000:]
    res = train(data, a, "--resume", "auto", "--total_iters", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint.load_state(checkpoint.resolve(a))["step"] == 6
    assert snapshot(b) == before_b  # the other run is untouched


def test_no_latest_but_checkpoints_resumes_from_the_newest_that_verifies(runs):
    data, a, _ = runs
    ck = a / "checkpoints"
    (ck / "latest").unlink()
    # the newest checkpoint is damaged: a flipped byte in its weights; the one before verifies
    w = ck / "step_000004" / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))
    res = train(data, a, "--resume", "auto", "--total_iters", "6", "--keep_last", "10")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step_000002, the newest checkpoint that verifies" in res.stderr
    assert "resuming" in res.stderr and "from step 2" in res.stderr
    assert (ck / "step_000002").is_dir() and (ck / "step_000004").is_dir()  # nothing pruned that it did not make
    assert checkpoint.load_state(checkpoint.resolve(a))["step"] == 6


def test_a_checkpoint_without_checksums_is_refused_unless_trusted(runs):
    _, a, _ = runs
    ckpt = checkpoint.resolve(a)
    (ckpt / "checksums.json").unlink()
    sample = [sys.executable, "bin/sample", "--checkpoint", str(ckpt), "--prompt", "Once", "--max_new_tokens", "3"]
    res = subprocess.run(sample, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "cannot be verified" in res.stderr and "--trust_unverified" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*sample, "--trust_unverified"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def _set(meta: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = meta
    for k in path:
        node = node[k]
    node[last] = value


@pytest.mark.parametrize("field,value,message", [
    ("splits.val.bytes", 0, "splits.val.bytes is 0"),
    ("splits.val.bytes", "12", "splits.val.bytes must be a non-negative integer"),
    ("splits.train.tokens", -1, "splits.train.tokens must be a non-negative integer"),
    ("tokenizer.vocab_size", 0, "tokenizer.vocab_size must be an integer"),
    ("tokenizer.vocab_size", 512.0, "tokenizer.vocab_size must be an integer"),
    ("tokenizer.eot_id", None, "tokenizer.eot_id must be an integer"),
    ("splits.val.shards", ["../../etc/passwd"], "splits.val.shards must be a list of file names"),
    ("splits.train.shard_token_counts", [1, 2], "one non-negative integer per shard"),
    ("tokenizer", [], "'tokenizer' is not an object"),
])
def test_a_bad_meta_json_field_stops_the_run_before_its_first_step(builtin_data, tmp_path, capsys, field, value,
                                                                   message):
    data = tmp_path / "data"
    shutil.copytree(builtin_data, data)
    meta = json.loads((data / "meta.json").read_text())
    _set(meta, field, value)
    (data / "meta.json").write_text(json.dumps(meta))
    before = snapshot(data)
    rc = train_main(["--data", str(data), "--out", str(tmp_path / "run"), *SHAPE, "--total_iters", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "meta.json" in err, err[-1500:]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert snapshot(data) == before


def test_the_studio_dashboard_reads_a_large_metrics_file_incrementally(tmp_path, monkeypatch):
    """bin/serve's run dashboard refreshes every few seconds: on a large metrics.jsonl it reads only the last
    MAX_FIRST_READ bytes the first time (from a line start), then only what was appended."""
    from storyllama import serve

    monkeypatch.setattr(serve, "MAX_FIRST_READ", 4096)
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": i, "loss": 5.0 - i * 1e-4}) + "\n" for i in range(2000)]
    (run / "metrics.jsonl").write_text("".join(lines))
    first = serve.read_metrics(run)
    assert 0 < len(first) < 200 and first[-1]["step"] == 1999  # the tail only, whole records
    assert [r["step"] for r in first] == list(range(first[0]["step"], 2000))
    reads = []
    from storyllama import metrics

    def counting(path, start=0, warn=True, _real=metrics.read_records):
        reads.append(start)
        return _real(path, start, warn)

    monkeypatch.setattr(metrics, "read_records", counting)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2000, "loss": 4.7}) + "\n")
    second = serve.read_metrics(run)
    assert second[-1]["step"] == 2000 and len(second) == len(first) + 1
    assert reads == [(run / "metrics.jsonl").stat().st_size - len(json.dumps({"step": 2000, "loss": 4.7})) - 1]
