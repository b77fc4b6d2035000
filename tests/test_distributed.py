"""Distributed training on CPU: 2 processes started by torchrun, gloo backend.

These run the commands the README shows (`torchrun --standalone --nproc_per_node=2 bin/train ...`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from storyllama import checkpoint

ROOT = Path(__file__).resolve().parent.parent
# The README's launcher: the `torchrun` beside this interpreter (the same as python -m torch.distributed.run).
_torchrun = Path(sys.executable).parent / "torchrun"
_launcher = [str(_torchrun)] if _torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
TORCHRUN = [*_launcher, "--standalone", "--nproc_per_node=2"]
SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "64", "--eval_iters", "2", "--log_interval", "1", "--device", "cpu",
         "--sample_tokens", "0", "--dropout", "0.0", "--warmup_iters", "0", "--min_lr_ratio", "1.0",
         "--max_lr", "2e-3", "--eval_interval", "100", "--save_interval", "100"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def launch(cmd: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    recs = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


# The recipe options that touch the step: Muon runs alike on every rank after DDP's one all-reduce; with
# --doc_aligned micro-batches score different numbers of targets (not the one after each EOT), so equivalence
# holds only because each step's summed loss is divided by the step's own count of scored targets.
RECIPES = {"adamw": [], "muon-doc-zero-ema": ["--optimizer", "muon", "--doc_aligned", "--zero_init", "--ema_decay",
                                              "0.9"]}


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ranks_equal_one_process_on_the_same_global_batch(builtin_data, tmp_path, recipe):
    """2 ranks x micro-batch 2 x 2 accumulation == 1 process x micro-batch 4 x 2 accumulation; both ranks
    end with identical weights, and every bucket is all-reduced exactly once per optimizer step."""
    steps = ["--total_iters", "4", "--total_batch_size", str(2 * 2 * 2 * 64), *RECIPES[recipe]]
    dump = tmp_path / "dump"
    dump.mkdir()
    res = launch([*TORCHRUN, "tests/ddp_worker.py", "--data", str(builtin_data), "--out", str(tmp_path / "ddp"),
                  *SHAPE, *steps, "--batch_size", "2"], env={"DUMP_DIR": str(dump)})
    assert res.returncode == 0, res.stderr[-3000:]
    single = launch([sys.executable, "bin/train", "--data", str(builtin_data), "--out", str(tmp_path / "single"),
                     *SHAPE, *steps, "--batch_size", "4"])
    assert single.returncode == 0, single.stderr[-3000:]

    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
    ref, _ = checkpoint.load_model(tmp_path / "single", weights="raw")  # the trained weights, as dumped
    for k, v in ref.state_dict().items():
        # atol: 0.5% of one Adam update (lr 2e-3); a missing all-reduce or a wrong scale moves weights ~1e-3.
        # Muon: Newton-Schulz (fp32 on a CPU) amplifies a last-bit difference in the gradient (another summation
        # order) more than AdamW does, but far below one Muon step (~2.5e-3 per entry)
        diff = (w0[k] - v).abs().max().item()
        if recipe == "adamw":
            torch.testing.assert_close(w0[k], v, rtol=1e-4, atol=1e-5, msg=f"DDP differs from one process on {k}")
        else:
            assert diff < 1e-4, f"DDP differs from one process on {k}: {diff}"
    # the logged (rank-averaged) losses match too
    for (s_a, l_a), (s_b, l_b) in zip(losses(tmp_path / "ddp"), losses(tmp_path / "single"), strict=True):
        assert s_a == s_b and abs(l_a - l_b) < 1e-4

    for r in (0, 1):
        rec = json.loads((dump / f"rank{r}.json").read_text())
        buckets = sorted(set(rec["calls"]))
        assert rec["steps"] == 4
        # every bucket exactly once per step: 2 micro-steps would double this without no_sync
        assert len(rec["calls"]) == 4 * len(buckets), rec


def test_compiled_ddp_still_all_reduces_once_per_step(builtin_data, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    res = launch([*TORCHRUN, "tests/ddp_worker.py", "--data", str(builtin_data), "--out", str(tmp_path / "run"),
                  *SHAPE, "--total_iters", "3", "--total_batch_size", str(2 * 2 * 2 * 64), "--batch_size", "2",
                  "--compile"], env={"DUMP_DIR": str(dump), "COMPILE_BACKEND": "aot_eager"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Dynamo does not know how to trace" not in res.stderr  # no graph break around DDP
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    calls = json.loads((dump / "rank0.json").read_text())["calls"]
    assert len(calls) == 3 * len(set(calls))


def test_a_failing_rank_ends_the_job_with_an_error(builtin_data, tmp_path):
    t0 = time.time()
    res = launch([*TORCHRUN, "bin/train", "--data", str(builtin_data), "--out", str(tmp_path / "run"), *SHAPE,
                  "--batch_size", "2", "--total_iters", "50"],
                 env={"STORYLLAMA_TEST_FAIL_AT": "1:2", "STORYLLAMA_DIST_TIMEOUT": "60"}, timeout=180)
    assert res.returncode != 0
    assert "injected failure on rank 1 at step 2" in res.stderr
    assert time.time() - t0 < 120


def test_a_nan_on_one_rank_is_skipped_by_every_rank(builtin_data, tmp_path):
    """Rank 1's loss alone is NaN at step 2 (its gradients stay finite, so the all-reduced gradient norm
    is finite): both ranks must still skip that update together and end with identical weights."""
    dump = tmp_path / "dump"
    dump.mkdir()
    res = launch([*TORCHRUN, "tests/ddp_worker.py", "--data", str(builtin_data), "--out", str(tmp_path / "run"),
                  *SHAPE, "--total_iters", "4", "--batch_size", "2"],
                 env={"DUMP_DIR": str(dump), "STORYLLAMA_TEST_NAN_AT": "1:2"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 update(s) skipped" in res.stderr
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"the ranks drifted apart on {k}"


def final_weights(run_dir: Path) -> dict:
    model, _ = checkpoint.load_model(run_dir)
    return model.state_dict()


def assert_weights_close(a: dict, b: dict) -> None:
    for k in a:  # the DDP tolerance above: reductions in another order, nothing more
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_restarts_a_failed_worker_group_from_the_last_checkpoint(builtin_data, tmp_path):
    """--max-restarts 1 and rank 1 failing once at step 3: the group restarts with the same command line,
    resumes from the step-2 checkpoint by itself, exits 0, and ends where an uninterrupted run ends."""
    common = ["--data", str(builtin_data), *SHAPE, "--total_iters", "6", "--save_interval", "2"]
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    # the uninterrupted reference in one process: 4 windows per step, as 2 ranks x 2
    res = launch([sys.executable, "bin/train", "--out", str(straight), *common, "--batch_size", "4"])
    assert res.returncode == 0, res.stderr[-3000:]
    res = launch([*_launcher, "--standalone", "--nproc_per_node=2", "--max-restarts=1", "bin/train", "--out",
                  str(restarted), *common, "--batch_size", "2"],
                 env={"STORYLLAMA_TEST_FAIL_AT": "1:3", "STORYLLAMA_DIST_TIMEOUT": "60"}, timeout=400)
    assert res.returncode == 0, "\n".join(ln for ln in res.stderr.splitlines() if "Warning" not in ln)[-6000:]
    assert "injected failure on rank 1 at step 3" in res.stderr
    assert "torchrun restart 1: resuming from" in res.stderr and "step_000002 (step 2)" in res.stderr
    assert checkpoint.load_state(checkpoint.resolve(restarted))["step"] == 6
    assert_weights_close(final_weights(straight), final_weights(restarted))


def test_a_run_resumes_exactly_across_world_sizes_and_accumulation(builtin_data, tmp_path):
    """One run moved between layouts with the same 4 windows per step: 2 ranks x 1 x 2 accumulation, then
    one process x 4, then 2 ranks x 2, equals one process x 4 throughout (a two-rank run that resumes, and a
    resume in each direction between 1 and 2 processes). Another tokens-per-step is refused."""
    def cmd(layout: str, out: Path, *extra: str) -> list[str]:
        procs, batch = layout.split("x")
        launcher = [*_launcher, "--standalone", f"--nproc_per_node={procs}"] if procs != "1" else [sys.executable]
        return [*launcher, "bin/train", "--data", str(builtin_data), "--out", str(out), *SHAPE, "--batch_size", batch,
                "--total_batch_size", str(4 * 64), *extra]

    straight, moved = tmp_path / "straight", tmp_path / "moved"
    for c in (cmd("1x4", straight, "--total_iters", "6"), cmd("2x1", moved, "--total_iters", "2"),
              cmd("1x4", moved, "--total_iters", "4", "--resume", "auto"),
              cmd("2x2", moved, "--total_iters", "6", "--resume", "auto")):
        res = launch(c)
        assert res.returncode == 0, res.stderr[-3000:]
    state = checkpoint.load_state(checkpoint.resolve(moved))
    # one global data position (windows consumed by all ranks), not one per rank
    assert state["data"]["windows"] == 6 * 4 and state["world_size"] == 2
    assert_weights_close(final_weights(straight), final_weights(moved))
    assert [s for s, _ in losses(moved)][-2:] == [5, 6]
    for (s_a, l_a), (s_b, l_b) in zip(losses(straight)[-2:], losses(moved)[-2:], strict=True):
        assert s_a == s_b and abs(l_a - l_b) < 1e-4
    # other tokens per step: refused, naming both numbers
    res = launch([sys.executable, "bin/train", "--data", str(builtin_data), "--out", str(moved), *SHAPE,
                  "--batch_size", "2", "--total_iters", "8", "--resume", "auto", "--total_batch_size", "128"])
    assert res.returncode == 2
    assert "saved with 256 tokens per optimizer step; this one has 128" in res.stderr.splitlines()[-1]
