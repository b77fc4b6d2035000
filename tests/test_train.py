"""The training loop end to end on CPU: logs, checkpoints, exact resume, errors, and the demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from storyllama import checkpoint
from storyllama.config import TrainConfig
from storyllama.train import main as train_main

# A very small model so each test trains in seconds on 2 cores.
SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "64", "--batch_size", "4", "--eval_iters", "2", "--log_interval", "1",
         "--device", "cpu", "--sample_tokens", "8"]


def run(builtin_data: Path, out: Path, *extra: str) -> int:
    return train_main(["--data", str(builtin_data), "--out", str(out), *SHAPE, *extra])


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def test_training_lowers_loss_and_writes_logs_plot_and_checkpoint(builtin_data, tmp_path):
    out = tmp_path / "run"
    assert run(builtin_data, out, "--total_iters", "30", "--eval_interval", "15", "--save_interval", "15",
               "--max_lr", "3e-3", "--warmup_iters", "3") == 0
    train = records(out, "loss")
    assert [s for s, _ in train] == list(range(1, 31))
    assert train[-1][1] < train[0][1] - 0.7, train  # it learns (ln 512 = 6.24 at the start)
    val = records(out, "val_bpb")
    assert [s for s, _ in val] == [15, 30] and all(0 < b < 20 for _, b in val)
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = checkpoint.resolve(out)
    assert ckpt.name == "step_000030"
    for f in ("model.safetensors", "model_config.json", "optimizer.pt", "trainer_state.json", "meta.json",
              "tokenizer.tiktoken"):
        assert (ckpt / f).is_file(), f
    state = checkpoint.load_state(ckpt)
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 4 * 64
    # The weights load without the trainer, into a plain state dict with unprefixed names.
    weights = load_file(str(ckpt / "model.safetensors"))
    assert "tok_embeddings.weight" in weights and not any(k.startswith(("module.", "_orig_mod.")) for k in weights)
    model, _ = checkpoint.load_model(out, weights="raw")
    ema, _ = checkpoint.load_model(out)  # the EMA weights (on by default) when a checkpoint has them
    assert model.cfg.dim == 64 and model.cfg.vocab_size == 512
    # --eval_only scores a checkpoint on the whole validation split, the same number a manual pass gives
    from storyllama.data import TokenData, bytes_per_token, val_batches
    from storyllama.train import parse_config, train

    cfg, args = parse_config(["--data", str(builtin_data), "--out", str(out), *SHAPE, "--eval_only",
                              "--resume", str(ckpt)])
    summary = train(cfg, args)
    val = TokenData(builtin_data, "val")
    with torch.no_grad():
        losses = [model(x, y).item() for x, y in val_batches(val, 4, 64)]
        losses_ema = [ema(x, y).item() for x, y in val_batches(val, 4, 64)]
    assert summary["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert summary["val_loss_ema"] == pytest.approx(sum(losses_ema) / len(losses_ema), rel=1e-5)
    assert summary["val_loss_ema"] != summary["val_loss"]
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2) / bytes_per_token(val.meta))


def test_resume_continues_exactly(builtin_data, tmp_path):
    """N steps straight == N/2 steps, stop, resume, N/2 more: same losses, same weights (with dropout and
    gradient accumulation, so the data position and random state must both be restored)."""
    common = ["--dropout", "0.1", "--total_batch_size", "512", "--warmup_iters", "0", "--min_lr_ratio", "1.0",
              "--eval_interval", "100", "--save_interval", "100"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert run(builtin_data, straight, "--total_iters", "8", *common) == 0
    assert run(builtin_data, halves, "--total_iters", "4", *common) == 0
    assert run(builtin_data, halves, "--total_iters", "8", "--resume", "auto", *common) == 0
    assert records(straight, "loss") == records(halves, "loss")
    a = load_file(str(checkpoint.resolve(straight) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(halves) / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_existing_run_needs_resume_flag(builtin_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(builtin_data, out, "--total_iters", "2") == 0
    assert run(builtin_data, out, "--total_iters", "4") == 2
    assert "--resume auto" in capsys.readouterr().err


def test_resume_with_a_different_shape_is_refused(builtin_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(builtin_data, out, "--total_iters", "2") == 0
    assert run(builtin_data, out, "--total_iters", "4", "--resume", "auto", "--dim", "128") == 2
    err = capsys.readouterr().err
    assert "dim: checkpoint 64, flags 128" in err


def test_accumulation_that_does_not_divide_says_the_numbers(builtin_data, tmp_path, capsys):
    assert run(builtin_data, tmp_path / "run", "--total_iters", "2", "--total_batch_size", "1000") == 2
    err = capsys.readouterr().err
    assert "1000" in err and "4 x 64 x 1 = 256" in err


def test_unknown_preset_suggests_close_names(builtin_data, tmp_path, capsys):
    assert train_main(["--data", str(builtin_data), "--out", str(tmp_path / "r"), "--preset", "stories15"]) == 2
    assert "stories15m" in capsys.readouterr().err


def test_seed_flag_names_still_work(builtin_data, tmp_path):
    out = tmp_path / "run"
    assert train_main(["--data", str(builtin_data), "--out", str(out), "--device", "cpu", "--embeddings_dims", "64",
                       "--no_of_heads", "4", "--no_kv_heads", "2", "--no_of_decoder_layers", "2", "--block_size", "64",
                       "--hidden_dim", "128", "--batch_size", "2", "--total_iters", "2", "--max_lr", "1e-3",
                       "--weight_decay_optim", "0.05", "--beta_1", "0.8", "--beta_2", "0.9", "--clip", "0.5",
                       "--warmup_iters", "1", "--eval_iters", "1", "--save_checkpoint_iter", "1",
                       "--prompt", "Lily", "--max_length", "4", "--temperature", "1.0"]) == 0
    state = checkpoint.load_state(checkpoint.resolve(out))
    cfg, m = state["train_config"], state["model_config"]
    assert (m["dim"], m["n_heads"], m["n_kv_heads"], m["n_layers"]) == (64, 4, 2, 2)
    assert (cfg["weight_decay"], cfg["beta1"], cfg["beta2"], cfg["clip"], cfg["sample_tokens"]) == (
        0.05, 0.8, 0.9, 0.5, 4)


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(max_lr=1.0, min_lr_ratio=0.1, warmup_iters=10, total_iters=110)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cfg.lr_at(110) == pytest.approx(0.1)
    lrs = [cfg.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_demo_runs_end_to_end(tmp_path, capsys):
    from storyllama.demo import main as demo_main

    rc = demo_main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--stories", "200",
                    "--tokenizer", "bpe:512", "--total_iters", "4", "--story_tokens", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Once upon a time" in out and "loss curve" in out
    assert checkpoint.resolve(tmp_path / "run").name == "step_000004"
    state = checkpoint.load_state(checkpoint.resolve(tmp_path / "run"))
    assert math.isfinite(state["best_val_loss"])
    from storyllama.config import SEED_RECIPE

    assert {k: state["train_config"][k] for k in SEED_RECIPE} == SEED_RECIPE  # the demo's measured recipe
