"""Resume as the tools advise, one writer per run, checkpoints that stay valid, and the step's hot path
(no host sync, one decision on every rank, --clip 0, compiled graphs that survive evaluations)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import Proc
from safetensors.torch import load_file

from storyllama import checkpoint
from storyllama.config import SEED_RECIPE
from storyllama.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "64", "--eval_iters", "2", "--log_interval", "1",
         "--device", "cpu", "--sample_tokens", "0", "--eval_interval", "1000"]


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), *SHAPE, *extra]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(checkpoint.resolve(a) / "model.safetensors")), load_file(
        str(checkpoint.resolve(b) / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_the_advised_resume_line_continues_the_same_run(builtin_data, tmp_path, monkeypatch, caplog):
    """A run with a non-default batch and length stops; the line it prints continues it to the same end, on
    the same schedule, and equals an uninterrupted run; resuming a finished run says so and trains nothing."""
    recipe = ["--batch_size", "2", "--total_iters", "6", "--max_lr", "1e-3", "--warmup_iters", "2",
              "--save_interval", "3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_main(args(builtin_data, straight, *recipe)) == 0
    monkeypatch.setenv("STORYLLAMA_TEST_FAIL_AT", "0:4")  # dies after the step-3 checkpoint
    with pytest.raises(RuntimeError, match="injected failure"):
        train_main(args(builtin_data, stopped, *recipe))
    monkeypatch.delenv("STORYLLAMA_TEST_FAIL_AT")
    assert checkpoint.load_state(checkpoint.resolve(stopped))["step"] == 3
    # exactly what a stopped run advises: no shape, batch or schedule flags
    assert train_main(["--data", str(builtin_data), "--out", str(stopped), "--resume", "auto"]) == 0
    state = checkpoint.load_state(checkpoint.resolve(stopped))
    assert state["step"] == 6 and state["train_config"]["batch_size"] == 2
    assert losses(stopped)[-3:] == losses(straight)[-3:]
    same_weights(straight, stopped)
    # a finished run: complete, exit 0, nothing trained
    n = len(losses(stopped))
    caplog.clear()
    with caplog.at_level("INFO", logger="storyllama"):
        assert train_main(["--data", str(builtin_data), "--out", str(stopped), "--resume", "auto"]) == 0
    assert "is complete: step 6 of 6" in caplog.text and len(losses(stopped)) == n
    # a flag given now changes that setting on purpose, and says so
    caplog.clear()
    with caplog.at_level("INFO", logger="storyllama"):
        assert train_main(["--data", str(builtin_data), "--out", str(stopped), "--resume", "auto",
                           "--total_iters", "7"]) == 0
    assert "changed settings: total_iters 6 -> 7" in caplog.text
    assert checkpoint.load_state(checkpoint.resolve(stopped))["step"] == 7


def test_a_second_trainer_on_the_same_run_is_refused(builtin_data, tmp_path):
    out = tmp_path / "run"
    first = Proc([sys.executable, "bin/train", *args(builtin_data, out, "--batch_size", "2", "--total_iters", "4",
                 "--save_interval", "2")], tmp_path / "log", STORYLLAMA_TEST_PAUSE_IN_SAVE="step_000002")
    try:
        first.wait_for_line("STORYLLAMA_TEST_PAUSED", "stdout")
        before = (out / "metrics.jsonl").read_bytes()
        second = subprocess.run([sys.executable, "bin/train", *args(builtin_data, out, "--resume", "auto")], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert "in use by another bin/train (pid" in last and "Traceback" not in second.stderr
        assert (out / "metrics.jsonl").read_bytes() == before
    finally:
        first.kill()
    # the lock died with the killed process: the run resumes (the killed save left no checkpoint, so it starts
    # again; two steps show it, where the default length would train 1,000)
    assert train_main(args(builtin_data, out, "--resume", "auto", "--batch_size", "2", "--total_iters", "2")) == 0


def test_resaving_a_step_keeps_latest_valid_and_prunes_by_step(builtin_data, tmp_path):
    out = tmp_path / "run"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "4", "--save_interval", "2")) == 0
    root = out / "checkpoints"
    old4 = (root / "step_000004" / "model.safetensors").read_bytes()
    # resume from the older checkpoint: the new step 4 takes another name, the complete old one is not replaced
    assert train_main(args(builtin_data, out, "--resume", str(root / "step_000002"))) == 0
    assert (root / "latest").read_text().strip() == "step_000004.1"
    assert (root / "step_000004" / "model.safetensors").read_bytes() == old4
    checkpoint.load_model(out)
    # pruning goes by step number, also past six digits
    for name in ("step_999999", "step_1000000", "step_1000001"):
        (root / name).mkdir()
    checkpoint._prune(root, keep_last=2)
    left = {p.name for p in root.iterdir() if p.is_dir()}
    assert {"step_1000000", "step_1000001", "step_000004.1"} <= left and "step_999999" not in left


def test_damaged_and_inconsistent_checkpoints_are_one_line_errors(builtin_data, tmp_path):
    out = tmp_path / "run"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "2")) == 0
    ckpt = checkpoint.resolve(out)

    def sample(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bin/sample", "--checkpoint", str(ckpt), "--max_new_tokens", "4",
                               *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)

    def resume(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "bin/train", *args(builtin_data, tmp_path / "r2", "--resume",
                               str(ckpt), "--total_iters", "4", *extra)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    # the weights sample reads: the EMA's by default, the trained ones with --weights raw
    for name, extra in (("model_ema.safetensors", ()), ("model.safetensors", ("--weights", "raw"))):
        weights = ckpt / name
        good = weights.read_bytes()
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor: loads "fine" without a checksum
        weights.write_bytes(bytes(flipped))
        res = sample(*extra)
        assert res.returncode == 2 and f"{name} is damaged" in res.stderr and "Traceback" not in res.stderr, name
        assert sample(*(() if extra else ("--weights", "raw"))).returncode == 0  # the other file is still read
        weights.write_bytes(good)
    # a truncated optimizer state: named, no traceback, nothing written
    opt = ckpt / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:1000])
    res = resume()
    assert res.returncode == 2 and "optimizer.pt" in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists()
    (ckpt / "checksums.json").unlink()  # no checksums: refused, unless the user says to trust it
    for res in (resume(), sample()):
        assert res.returncode == 2 and "cannot be verified" in res.stderr and "--trust_unverified" in res.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists()
    res = resume("--trust_unverified")  # trusted: then torch.load's own failure, one line
    assert res.returncode == 2 and "cannot load the optimizer state" in res.stderr and "Traceback" not in res.stderr
    assert sample("--trust_unverified").returncode == 0
    # a model_config.json that does not describe its weights
    cfg = json.loads((ckpt / "model_config.json").read_text())
    (ckpt / "model_config.json").write_text(json.dumps({**cfg, "hidden_dim": 192}))
    res = sample("--trust_unverified")
    assert res.returncode == 2 and "does not match" in res.stderr and "Traceback" not in res.stderr


def test_non_finite_weights_are_never_saved(builtin_data, tmp_path, capsys):
    """Weights that became non-finite (here: a checkpoint poisoned for real, every update then skipped) are
    refused at the save, the run ends with exit 2, and the message says truthfully that nothing was kept."""
    out = tmp_path / "run"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "1")) == 0
    bad = tmp_path / "poisoned"
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(checkpoint.resolve(out), bad)
    w = load_file(str(bad / "model.safetensors"))
    w["layers.0.attention.wq.weight"][0, 0] = float("inf")
    save_file(w, str(bad / "model.safetensors"))
    checkpoint.write_checksums(bad)
    rc = train_main(args(builtin_data, tmp_path / "run2", "--resume", str(bad), "--total_iters", "3",
                         "--max_bad_steps", "100"))
    err = capsys.readouterr().err
    assert rc == 2 and "weights are non-finite" in err and "No checkpoint was written by this run" in err
    assert not (tmp_path / "run2" / "checkpoints").exists() or not list((tmp_path / "run2" / "checkpoints").glob("s*"))


def test_clip_zero_means_no_clipping(builtin_data, tmp_path):
    runs = {}
    for clip in ("0", "1e9", "1e-6"):
        out = tmp_path / f"clip{clip}"
        assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "2", "--clip", clip,
                               "--max_lr", "1e-2", "--warmup_iters", "0", "--weight_decay", "0")) == 0
        runs[clip] = load_file(str(checkpoint.resolve(out) / "model.safetensors"))
    for k in runs["0"]:
        torch.testing.assert_close(runs["0"][k], runs["1e9"][k], rtol=0, atol=0)
    # and clipping still clips: a tiny clip gives other weights
    assert any(not torch.equal(runs["0"][k], runs["1e-6"][k]) for k in runs["0"])


@pytest.mark.parametrize("recipe", [[], ["--optimizer", "muon", "--ema_decay", "0.9"], ["--doc_aligned"]],
                         ids=["adamw", "muon_ema", "doc_aligned"])
def test_the_training_step_never_reads_the_device(builtin_data, tmp_path, monkeypatch, recipe):
    """Every way a tensor's value reaches Python (item, tolist, bool, float, int) is counted while the loop is
    inside train_step; the loop's own reads go through one counted helper, at log steps only. Also with Muon
    (its skip is a select on the device) and the EMA update."""
    import storyllama.train as T

    calls: list[str] = []
    inside = [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if inside[0]:
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_step = T.train_step

    def watched(*a, **k):
        inside[0] = True
        try:
            return real_step(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(T, "train_step", watched)
    cfg, ns = T.parse_config(args(builtin_data, tmp_path / "run", "--batch_size", "2", "--total_iters", "12",
                                  "--log_interval", "4", "--save_interval", "1000", "--total_batch_size", "256",
                                  *recipe))
    summary = T.train(cfg, ns)
    assert summary["step"] == 12 and calls == [], calls
    assert summary["host_reads"]["report"] == 3  # steps 4, 8, 12


def test_torchrun_with_one_process_destroys_its_group(builtin_data, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    res = subprocess.run([*launcher, "--standalone", "--nproc_per_node=1", "tests/ddp_worker.py",
                          *args(builtin_data, tmp_path / "run", "--batch_size", "2", "--total_iters", "2")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "DUMP_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]  # ddp_worker asserts the group is gone after train()


@pytest.mark.slow
def test_evaluations_do_not_recompile_the_training_graph_and_late_dropout_recompiles_once(builtin_data, tmp_path):
    """Sampling at each evaluation used to attach a KV cache to the module being trained, changing the
    compiled graph's guards: a recompile after the first evaluation. Now three evaluations with samples
    compile no more graphs than one. --dropout_start: the dropout rate is a constant of the compiled graph,
    so the switch compiles exactly one more graph, and the steps after it reuse that graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from storyllama.train import parse_config, train

    def graphs(out: Path, total: str, *flags: str) -> int:
        torch._dynamo.reset()
        counters.clear()
        cfg, ns = parse_config(args(builtin_data, out, "--batch_size", "2", "--total_iters", total,
                                    "--eval_interval", "2", "--sample_tokens", "4", "--compile", "--log_interval",
                                    "2", "--save_interval", "1000", *flags))
        train(cfg, ns)
        return counters["stats"]["unique_graphs"]

    one, three = graphs(tmp_path / "one", "2"), graphs(tmp_path / "three", "6")
    assert three == one, (one, three)
    late = graphs(tmp_path / "late", "6", "--dropout", "0.1", "--dropout_start", "3")
    assert late == one + 1, (one, late)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA's sync debug mode checks the device queue")
def test_the_training_step_does_not_sync_on_cuda(builtin_data, tmp_path, monkeypatch):
    import storyllama.train as T

    real_step = T.train_step

    def strict(*a, **k):
        torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation inside the step raises
        try:
            return real_step(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(T, "train_step", strict)
    cfg, ns = T.parse_config(["--data", str(builtin_data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                              "--block_size", "64", "--batch_size", "4", "--total_iters", "6", "--log_interval", "3",
                              "--device", "cuda", "--sample_tokens", "0", "--compile", "false"])
    assert T.train(cfg, ns)["step"] == 6


def test_init_from_starts_a_fine_tune_from_a_runs_weights(builtin_data, tmp_path, capsys):
    """--init_from: the source run's weights (and model shape), a fresh optimizer, step 0, a new run directory;
    data with another tokenizer is refused by name."""
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert train_main(args(builtin_data, base, "--batch_size", "2", "--total_iters", "3")) == 0
    # no shape flags: the shape comes from the source; an LR of 1e-12 leaves the weights where they started
    assert train_main(["--data", str(builtin_data), "--out", str(tuned), "--init_from", str(base), "--batch_size", "2",
                       "--total_iters", "2", "--max_lr", "1e-12", "--device", "cpu", "--sample_tokens", "0"]) == 0
    state = checkpoint.load_state(checkpoint.resolve(tuned))
    assert state["step"] == 2 and state["tokens_seen"] == 2 * 2 * 64
    opt = torch.load(checkpoint.resolve(tuned) / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {2}  # a fresh optimizer, not the base's 3 steps
    a = load_file(str(checkpoint.resolve(base) / "model.safetensors"))
    b = load_file(str(checkpoint.resolve(tuned) / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-8)
    # the base trained with the defaults (Muon, EMA); the fine-tune took the seed's optimizer settings, except
    # those given on its command line
    assert checkpoint.load_state(checkpoint.resolve(base))["train_config"]["optimizer"] == "muon"
    assert {k: state["train_config"][k] for k in SEED_RECIPE} == SEED_RECIPE
    assert not (checkpoint.resolve(tuned) / "model_ema.safetensors").exists()
    given = tmp_path / "given"
    assert train_main(["--data", str(builtin_data), "--out", str(given), "--init_from", str(base), "--batch_size", "2",
                       "--total_iters", "1", "--optimizer", "muon", "--ema_decay", "0.9", "--device", "cpu",
                       "--sample_tokens", "0"]) == 0
    saved = checkpoint.load_state(checkpoint.resolve(given))["train_config"]
    assert {k: saved[k] for k in SEED_RECIPE} == {**SEED_RECIPE, "optimizer": "muon", "ema_decay": 0.9}
    from storyllama.data_prep.prepare import main as prepare_main

    other = tmp_path / "other"
    assert prepare_main(["--builtin", "--builtin_stories", "300", "--tokenizer", "bpe:600", "--out", str(other),
                         "--num_proc", "1"]) == 0
    capsys.readouterr()
    assert train_main(["--data", str(other), "--out", str(tmp_path / "t2"), "--init_from", str(base),
                       "--total_iters", "2", "--device", "cpu"]) == 2
    assert "its tokenizer" in capsys.readouterr().err and not (tmp_path / "t2" / "checkpoints").exists()


def test_a_checkpoint_older_than_the_recipe_flags_resumes_with_the_seed_recipe(builtin_data, tmp_path):
    """A checkpoint written before --optimizer, --ema_decay, ... existed was trained with the seed's AdamW and
    no EMA: it resumes that way (the new defaults would not fit its optimizer state), with no flag needed."""
    from storyllama.data_prep.tokenizer import file_sha256

    out = tmp_path / "old"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "2", "--optimizer", "adamw",
                           "--ema_decay", "0", "--weight_decay", "0.1")) == 0
    ckpt = checkpoint.resolve(out)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for k in SEED_RECIPE:
        del state["train_config"][k]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["trainer_state.json"] = file_sha256(ckpt / "trainer_state.json")
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    assert train_main(["--out", str(out), "--resume", "auto", "--total_iters", "3", "--device", "cpu"]) == 0
    saved = checkpoint.load_state(checkpoint.resolve(out))
    assert saved["step"] == 3 and {k: saved["train_config"][k] for k in SEED_RECIPE} == SEED_RECIPE


def test_wandb_without_a_login_says_how_before_writing_anything(builtin_data, tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "1", "--wandb")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "wandb login" in err[-1] and "WANDB_MODE=offline" in err[-1] and not out.exists()


def test_doc_aligned_run_resumes_exactly_and_refuses_a_switch(builtin_data, tmp_path, monkeypatch, capsys):
    """--doc_aligned: the first logged loss is the document-masked loss of the first aligned batch at the
    initial weights; a stopped run resumes to the uninterrupted one's losses and weights; resuming with the
    flag switched is a one-line error naming it."""
    from storyllama.data import RandomBatches, TokenData
    from storyllama.model import Llama

    data = TokenData(builtin_data, "train")
    # a seed whose first batch holds a story's end (stories are longer than these 64-token windows)
    seed = next(s for s in range(100) if (RandomBatches(data, 2, 64, s, doc_aligned=True).batch_at(0)[0]
                                          == data.eot_id).any())
    x, y = RandomBatches(data, 2, 64, seed, doc_aligned=True).batch_at(0)
    # not zero-initialised: a block that starts as the identity would hide what the mask does at step 0
    recipe = ["--batch_size", "2", "--total_iters", "4", "--save_interval", "2", "--doc_aligned", "--seed", str(seed),
              "--zero_init", "false"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train_main(args(builtin_data, straight, *recipe)) == 0
    torch.manual_seed(seed)
    model = Llama(checkpoint.load_model_config(checkpoint.resolve(straight)))
    with torch.no_grad():
        doc, plain = model(x, y, doc_eot=data.eot_id).item(), model(x, y).item()
    assert losses(straight)[0][1] == pytest.approx(doc, abs=1e-5) and abs(doc - plain) > 1e-4
    monkeypatch.setenv("STORYLLAMA_TEST_FAIL_AT", "0:3")  # dies after the step-2 checkpoint
    with pytest.raises(RuntimeError, match="injected failure"):
        train_main(args(builtin_data, stopped, *recipe))
    monkeypatch.delenv("STORYLLAMA_TEST_FAIL_AT")
    assert train_main(["--data", str(builtin_data), "--out", str(stopped), "--resume", "auto"]) == 0
    assert checkpoint.load_state(checkpoint.resolve(stopped))["data"]["doc_aligned"] is True
    assert losses(stopped)[-2:] == losses(straight)[-2:]
    same_weights(straight, stopped)
    capsys.readouterr()
    assert train_main(["--data", str(builtin_data), "--out", str(stopped), "--resume", "auto", "--total_iters", "6",
                       "--doc_aligned", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved with --doc_aligned true; this one has --doc_aligned false" in err[0]


def test_eval_only_scores_a_plain_checkpoint_with_document_masking(builtin_data, tmp_path):
    """--eval_only --doc_aligned true on a checkpoint trained without it: the validation windows scored with
    document masking (the flag overrides the saved setting), which gives another loss than the plain pass."""
    from storyllama.data import TokenData, val_batches
    from storyllama.train import parse_config, train

    out = tmp_path / "plain"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "4", "--max_lr", "1e-2",
                           "--warmup_iters", "0", "--zero_init", "false")) == 0  # attention that matters at once
    scored = {}
    for flag in ("false", "true"):
        cfg, ns = parse_config(["--out", str(tmp_path / "eval"), "--resume", str(checkpoint.resolve(out)),
                                "--eval_only", "--doc_aligned", flag, "--device", "cpu"])
        summary = train(cfg, ns)
        scored[flag] = summary["val_loss"]
    val = TokenData(builtin_data, "val")
    model = summary["model"].eval()
    with torch.no_grad():
        doc = [model(x, y, doc_eot=val.eot_id).double() for x, y in val_batches(val, 2, 64)]
    assert scored["true"] == pytest.approx(float(sum(doc) / len(doc)), rel=1e-6)
    assert abs(scored["true"] - scored["false"]) > 1e-4


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_flag_changed_on_resume_reaches_the_optimizer(builtin_data, tmp_path, optimizer):
    """The saved optimizer state carries its groups' betas and weight decay; the resumed run's flags win."""
    out = tmp_path / "run"
    assert train_main(args(builtin_data, out, "--batch_size", "2", "--total_iters", "2", "--optimizer", optimizer)) == 0
    assert train_main(["--data", str(builtin_data), "--out", str(out), "--resume", "auto", "--total_iters", "3",
                       "--weight_decay", "0.5", "--beta2", "0.99", "--muon_weight_decay", "0.3"]) == 0
    state = torch.load(checkpoint.resolve(out) / "optimizer.pt", weights_only=True)
    groups = state["param_groups"] if optimizer == "adamw" else state["adamw"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.9, 0.99) for g in groups)
    if optimizer == "muon":
        assert [g["weight_decay"] for g in state["muon"]["param_groups"]] == [0.3]
