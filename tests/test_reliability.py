"""Faults injected for real while training: signals, SIGKILL inside a save, a full disk, an unwritable
run directory, non-finite losses, damaged data. Each asserts what the user sees and what is kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from procs import Proc
from safetensors.torch import load_file, save_file

from storyllama import checkpoint
from storyllama.data_prep.prepare import main as prepare_main
from storyllama.export import main as export_main
from storyllama.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "64", "--batch_size", "4", "--eval_iters", "2", "--log_interval", "1",
         "--device", "cpu", "--sample_tokens", "0", "--eval_interval", "1000"]


def train_cmd(builtin_data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "bin/train", "--data", str(builtin_data), "--out", str(out), *SHAPE, *extra]


def steps_logged(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_checkpoints_and_exits_zero(builtin_data, tmp_path, sig):
    out = tmp_path / "run"
    proc = Proc(train_cmd(builtin_data, out, "--total_iters", "100000", "--save_interval", "100000"),
                tmp_path / "log")
    proc.wait_for_line("training 100000 steps")
    time.sleep(3)  # some steps
    proc.send_signal(sig)
    rc, err = proc.finish()
    assert rc == 0, err[-2000:]
    assert "--resume auto" in err and "stopped by a signal" in err
    ckpt = checkpoint.resolve(out)
    stopped_at = checkpoint.load_state(ckpt)["step"]
    assert stopped_at >= 1 and steps_logged(out)[-1] == stopped_at
    # and the run continues from there
    assert train_main([*train_cmd(builtin_data, out, "--total_iters", str(stopped_at + 2), "--resume", "auto",
                                  "--save_interval", "100000")[2:]]) == 0
    assert checkpoint.load_state(checkpoint.resolve(out))["step"] == stopped_at + 2
    assert steps_logged(out)[-3:] == [stopped_at, stopped_at + 1, stopped_at + 2]


def test_sigkill_inside_a_save_keeps_the_previous_checkpoint(builtin_data, tmp_path):
    out = tmp_path / "run"
    proc = Proc(train_cmd(builtin_data, out, "--total_iters", "8", "--save_interval", "2"), tmp_path / "log",
                STORYLLAMA_TEST_PAUSE_IN_SAVE="step_000004")
    proc.wait_for_line("STORYLLAMA_TEST_PAUSED step_000004", "stdout")
    proc.kill()
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000002"
    assert not (root / "step_000004").exists()
    assert list(root.glob(".tmp_step_000004_*")), "the killed save's files stay under a temporary name"
    ckpt = checkpoint.resolve(out)
    model, _ = checkpoint.load_model(ckpt)  # complete and loadable
    assert checkpoint.load_state(ckpt)["step"] == 2
    # resume continues from step 2 and clears the debris
    assert train_main(train_cmd(builtin_data, out, "--total_iters", "4", "--save_interval", "2",
                                "--resume", "auto")[2:]) == 0
    assert (root / "latest").read_text().strip() == "step_000004"
    assert not list(root.glob(".tmp_*"))


def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(builtin_data, tmp_path):
    probe = tmp_path / "probe"
    assert train_main(train_cmd(builtin_data, probe, "--total_iters", "1")[2:]) == 0
    one = sum(f.stat().st_size for f in checkpoint.resolve(probe).iterdir())
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    size_kb = (int(one * 1.5) + 400_000) // 1024
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk for real: {r.stderr.decode().strip()}")
    try:
        out = mnt / "run"
        res = subprocess.run(train_cmd(builtin_data, out, "--total_iters", "20", "--save_interval", "1"), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        assert "could not write a checkpoint" in res.stderr and "MB free" in res.stderr
        assert "Earlier checkpoints are untouched" in res.stderr and "Traceback" not in res.stderr
        ckpt = checkpoint.resolve(out)  # the last complete one, still whole
        checkpoint.load_model(ckpt)
        assert checkpoint.load_state(ckpt)["step"] >= 1
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unwritable_run_directory_is_a_clear_error(builtin_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = subprocess.run(train_cmd(builtin_data, blocker / "run", "--total_iters", "2"), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert "Not a directory" in res.stderr and "Traceback" not in res.stderr
    assert blocker.read_text() == "not a directory"


def test_a_nan_step_is_skipped_and_training_goes_on(builtin_data, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(train_cmd(builtin_data, out, "--total_iters", "5"), cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "STORYLLAMA_TEST_NAN_AT": "2"}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # the NaN is injected into the third step (index 2), reported when step 3 is logged
    assert "step 3: non-finite loss or gradient; 1 update(s) skipped" in res.stderr and "(1/5 in a row)" in res.stderr
    model, _ = checkpoint.load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(builtin_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(train_cmd(builtin_data, out, "--total_iters", "2")[2:]) == 0
    good = checkpoint.resolve(out)
    # poison a copy of the weights for real: the resumed run's every loss is NaN
    weights = load_file(str(good / "model.safetensors"))
    poisoned = dict(weights, **{"norm.weight": torch.full_like(weights["norm.weight"], float("nan"))})
    bad = out / "checkpoints" / "poisoned"
    shutil.copytree(good, bad)
    save_file(poisoned, str(bad / "model.safetensors"))
    checkpoint.write_checksums(bad)  # a checkpoint saved that way, not a damaged file
    rc = train_main(train_cmd(builtin_data, tmp_path / "run2", "--total_iters", "20", "--max_bad_steps", "3",
                              "--resume", str(bad))[2:])
    err = capsys.readouterr().err
    assert rc == 2
    # run2 saved nothing, and the message says so instead of promising a "last good checkpoint"
    assert "3 non-finite steps in a row" in err and "No checkpoint was written by this run" in err
    assert not (tmp_path / "run2" / "checkpoints" / "latest").exists()  # nothing bad was saved
    assert load_file(str(good / "model.safetensors"))["norm.weight"].isfinite().all()


def test_truncated_shard_is_named_before_training(builtin_data, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(builtin_data, broken)
    shard = broken / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert train_main(train_cmd(broken, tmp_path / "run", "--total_iters", "2")[2:]) == 2
    err = capsys.readouterr().err
    assert "train_000000.bin" in err and "truncated" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_on_data_with_another_tokenizer_is_refused(builtin_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(train_cmd(builtin_data, out, "--total_iters", "2")[2:]) == 0
    other = tmp_path / "other"
    assert prepare_main(["--builtin", "--builtin_stories", "300", "--tokenizer", "bpe:600", "--out", str(other),
                         "--num_proc", "1"]) == 0
    assert train_main(train_cmd(other, out, "--total_iters", "4", "--resume", "auto")[2:]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_shards_shorter_than_one_block_are_refused(builtin_data, tmp_path, capsys):
    cmd = train_cmd(builtin_data, tmp_path / "run", "--total_iters", "2", "--block_size", "100000")
    assert train_main(cmd[2:]) == 2
    assert "block" in capsys.readouterr().err


def test_empty_validation_split_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    src = tmp_path / "stories.txt"
    src.write_text("\n<|endoftext|>\n".join(f"Story {i} about a cat and a dog." * 20 for i in range(60)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = prepare_main(["--train", str(src), "--val", str(empty), "--tokenizer", "bpe:300", "--out", str(data)])
    if rc == 0:  # prepare_data accepted it: then training must refuse it clearly
        assert train_main(train_cmd(data, tmp_path / "run", "--total_iters", "2")[2:]) == 2
    assert "val" in capsys.readouterr().err.lower()


def test_out_of_memory_suggests_a_smaller_micro_batch(builtin_data, tmp_path, capsys, monkeypatch):
    from storyllama.model import Llama

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Llama, "forward", oom)
    assert train_main(train_cmd(builtin_data, tmp_path / "run", "--total_iters", "2")[2:]) == 2
    assert "lower --batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["export-hf", "export-gguf", "import"])
def test_a_full_disk_while_exporting_or_importing_says_nothing_was_changed(builtin_data, tmp_path, what):
    """The safetensors / GGUF writers on a disk too small for the model: one line naming --out, that the disk is
    full, the space left, and that nothing was changed; no partial file or staging directory stays behind."""
    run = tmp_path / "run"
    assert train_main(train_cmd(builtin_data, run, "--total_iters", "1")[2:]) == 0
    hf = tmp_path / "hf"
    if what == "import":
        assert export_main(["--run", str(run), "--out", str(hf)]) == 0
    weights = checkpoint.resolve(run) / "model.safetensors"
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    size_kb = max(64, weights.stat().st_size // 2048)  # half the weights
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk for real: {r.stderr.decode().strip()}")
    try:
        (mnt / "notes.txt").write_text("the user's own file\n")
        tool, args = {"export-hf": ("export", ["--run", str(run), "--out", str(mnt / "out")]),
                      "export-gguf": ("export", ["--run", str(run), "--out", str(mnt / "out.gguf"), "--format",
                                                 "gguf"]),
                      "import": ("import", [str(hf), "--out", str(mnt / "out")])}[what]
        res = subprocess.run([sys.executable, f"bin/{tool}", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        line = res.stderr.strip().splitlines()[-1]
        assert "the disk is full" in line and "MB free" in line and "nothing was changed" in line, line
        assert str(mnt / "out") in line, line
        assert sorted(p.name for p in mnt.iterdir()) == ["notes.txt"], list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])
