"""The training recipe's options: --optimizer muon (its update against the published math, a skipped step,
exact resume), --zero_init, and --ema_decay (evaluated, saved, resumed, and used by sample / export)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoint import save_checkpoint, tiny_model

from storyllama import checkpoint
from storyllama.config import ModelConfig, TrainConfig
from storyllama.model import Llama
from storyllama.optim import Ema, MuonAdamW, hidden_matrices
from storyllama.train import main as train_main

SHAPE = ["--preset", "tiny", "--dim", "64", "--n_layers", "2", "--n_heads", "4", "--n_kv_heads", "2",
         "--hidden_dim", "128", "--block_size", "64", "--batch_size", "2", "--eval_iters", "2", "--log_interval", "1",
         "--device", "cpu", "--sample_tokens", "0"]
SMALL = ModelConfig(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, block_size=16, hidden_dim=128)


def _newton_schulz64(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration, in float64, with torch's coefficients and step count."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def _two_muon_steps(ns_dtype: torch.dtype, seed: int = 0):
    """Two steps of MuonAdamW on a one-layer model whose weights are of order 1 (so the decay lr * wd * W is
    well above rounding); returns (model, optimizer, the gradients of each step, the starting weights)."""
    torch.manual_seed(seed)
    model = Llama(SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(optimizer="muon", max_lr=1e-3, muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=0.5)
    opt = MuonAdamW(model, cfg, fused=True, ns_dtype=ns_dtype)
    steps = []
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        for group in opt.param_groups:
            group["lr"] = cfg.max_lr * group.get("lr_scale", 1.0)  # what train_step does
        opt.step(torch.tensor(True))
        steps.append(grads)
    return model, opt, steps, start


def test_muon_in_float32_equals_the_published_update_in_float64():
    """Momentum buf = mu buf + g, Nesterov g + mu buf, 5 Newton-Schulz steps, lr x sqrt(max(1, rows/cols)) ("original"),
    decoupled weight decay lr * wd * W, on tall, wide and square matrices over two steps (momentum matters)."""
    model, opt, steps, start = _two_muon_steps(torch.float32)
    assert set(hidden_matrices(model)) == {f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")} | {
        f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    for name, p in model.named_parameters():
        if name not in hidden_matrices(model):
            continue
        w, buf, lr = start[name].double(), torch.zeros_like(p, dtype=torch.float64), 0.02
        for grads in steps:
            g = grads[name].double()
            buf = 0.95 * buf + g
            update = lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])) * _newton_schulz64(g + 0.95 * buf)
            w = w * (1 - lr * 0.5) - update
        # fp32 rounding through 10 Newton-Schulz matmul chains: ~1e-6 of an update entry (measured); a missing
        # sqrt(2), Nesterov term or decay would be off by a whole update
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-4 * update.abs().max().item(), msg=name)
        # momentum kept as a lerp like torch's: (1 - mu) times the sum above (Newton-Schulz normalises it away)
        torch.testing.assert_close(opt.muon.state[p]["momentum_buffer"].double(), 0.05 * buf, rtol=1e-6, atol=1e-6)


def test_muon_in_bfloat16_equals_torch_optim_muon():
    """The CUDA path (Newton-Schulz in bf16, same-shape matrices batched) against PyTorch's own Muon: equal to
    bf16 rounding (1% of the largest update entry; measured well under that)."""
    model, _, steps, start = _two_muon_steps(torch.bfloat16)
    for name, p in model.named_parameters():
        if name not in hidden_matrices(model):
            continue
        ref = torch.nn.Parameter(start[name].clone())
        torch_muon = torch.optim.Muon([ref], lr=0.02, weight_decay=0.5, momentum=0.95, nesterov=True,
                                      adjust_lr_fn="original")
        for grads in steps:
            before = ref.detach().clone()
            ref.grad = grads[name].clone()
            torch_muon.step()
        last_update = (ref.detach() - before * (1 - 0.02 * 0.5)).abs().max().item()
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=0, atol=0.01 * last_update, msg=name)


def assert_same(a, b, where: str = "") -> None:
    """Nested dicts / lists / tuples of tensors and plain values: equal bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _backward(model: Llama, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    model(x, y).backward()


def test_a_skipped_muon_step_leaves_weights_and_optimizer_state_exactly_unchanged():
    torch.manual_seed(0)
    model = Llama(SMALL)
    opt = MuonAdamW(model, TrainConfig(optimizer="muon", max_lr=1e-2, muon_weight_decay=0.1), fused=True)
    # a skipped first step: the weights stay, the state is as fresh as before (AdamW makes its zero moments and
    # step 0 at its first step, skipped or not; Muon's zero momentum exists from the start)
    before = copy.deepcopy(model.state_dict())
    _backward(model, 0)
    opt.step(torch.tensor(False))
    opt.zero_grad()
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    state = opt.state_dict()
    fresh = [t for part in ("adamw", "muon") for s in state[part]["state"].values() for t in s.values()]
    assert len(fresh) == 4 * 3 + 7 and not any(t.any() for t in fresh)
    _backward(model, 1)
    opt.step(torch.tensor(True))
    opt.zero_grad()
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _backward(model, 2)
    for p in model.parameters():
        p.grad.view(-1)[0] = math.nan  # a non-finite gradient in every tensor, Muon's and AdamW's
    opt.step(torch.tensor(False))
    opt.zero_grad()
    assert_same((model.state_dict(), opt.state_dict()), before)
    _backward(model, 3)
    opt.step(torch.tensor(True))  # and the next good step updates
    assert not torch.equal(model.state_dict()["layers.0.attention.wq.weight"],
                           before[0]["layers.0.attention.wq.weight"])


def test_ema_is_the_running_mean_then_the_exponential_average():
    """--ema_decay d: after step k the average is the mean of the k trained weights while k <= 1 / (1 - d) (the
    initial weights get no share), then d * average + (1 - d) * weights; checked against float64 by hand."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = Ema(model, 0.75)  # a running mean for 4 steps, then the EMA
    seen: list[list[torch.Tensor]] = []
    for step in range(1, 10):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        seen.append([p.detach().double().clone() for p in model.parameters()])
        ema.update(step)
        if step <= 4:
            ref = [sum(w[i] for w in seen) / step for i in range(2)]
        else:
            ref = [0.75 * r + 0.25 * w for r, w in zip(ref, seen[-1])]
        for got, want in zip(ema.module.parameters(), ref):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_zero_init_starts_wo_and_w2_at_zero_and_the_first_step_moves_them():
    torch.manual_seed(0)
    model = Llama(SMALL)
    model.zero_output_projections()
    zeroed = [n for n, p in model.named_parameters() if not p.any()]
    assert zeroed == ["layers.0.attention.wo.weight", "layers.0.feed_forward.w2.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)
    loss0 = model(x, y)
    loss0.backward()
    named = dict(model.named_parameters())
    for n in zeroed:
        assert named[n].grad.abs().sum() > 0, n
    opt.step()
    assert model(x, y) < loss0


def records(run_dir: Path, key: str) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def test_muon_with_ema_and_zero_init_resumes_exactly_and_evaluates_both(builtin_data, tmp_path):
    """8 steps straight == 4, stop, resume, 4 more: the same losses, weights, EMA weights and optimizer state
    (with late dropout and accumulation); --zero_init is not applied again on
    resume (that would zero wo/w2 mid-run); evaluations log the raw and the EMA losses; --eval_only scores both."""
    # a constant lr: the halves' first run, 4 steps long, would have a shorter cosine
    common = [*SHAPE, "--dropout", "0.1", "--total_batch_size", "256", "--warmup_iters", "0", "--min_lr_ratio", "1",
              "--eval_interval", "4",
              "--save_interval", "100", "--optimizer", "muon", "--ema_decay", "0.8", "--zero_init", "true",
              "--dropout_start", "6"]  # the stop (step 4) falls before dropout starts
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train_main(["--data", str(builtin_data), "--out", str(straight), "--total_iters", "8", *common]) == 0
    assert train_main(["--data", str(builtin_data), "--out", str(halves), "--total_iters", "4", *common]) == 0
    assert train_main(["--data", str(builtin_data), "--out", str(halves), "--total_iters", "8", "--resume", "auto",
                       *common]) == 0
    assert records(straight, "loss") == records(halves, "loss")
    a, b = checkpoint.resolve(straight), checkpoint.resolve(halves)
    for fname in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = load_file(str(a / fname)), load_file(str(b / fname))
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (fname, k)
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (a, b))
    assert_same(oa, ob)
    assert set(json.loads((a / "checksums.json").read_text())) >= {"model.safetensors", "model_ema.safetensors"}
    assert [s for s, _ in records(straight, "val_loss_ema")] == [4, 8]
    assert [s for s, _ in records(straight, "val_bpb_ema")] == [4, 8]
    raw, ema = dict(records(straight, "val_loss")), dict(records(straight, "val_loss_ema"))
    assert raw[8] != ema[8]
    # `best` goes by the EMA's loss; the trainer state keeps that number
    assert checkpoint.load_state(a)["best_val_loss"] == pytest.approx(min(ema.values()))
    from storyllama.train import parse_config, train

    cfg, ns = parse_config(["--data", str(builtin_data), "--out", str(straight), "--eval_only", "--resume", str(a)])
    summary = train(cfg, ns)
    assert {"val_loss", "val_bpb", "val_loss_ema", "val_bpb_ema"} <= set(summary)
    assert summary["val_loss"] != summary["val_loss_ema"]
    # switching the optimizer on resume is refused by name, not as a damaged optimizer file
    rc = train_main(["--data", str(builtin_data), "--out", str(halves), "--total_iters", "9", "--resume", "auto",
                     "--optimizer", "adamw"])
    assert rc == 2


def test_late_dropout_is_off_before_dropout_start_and_on_from_it(builtin_data, tmp_path):
    """--dropout_start 3: steps 1-3 train exactly as with no dropout, steps from 4 on with it."""
    common = [*SHAPE, "--total_iters", "5", "--log_interval", "1", "--eval_interval", "100", "--save_interval", "100"]
    runs = {"late": ["--dropout", "0.3", "--dropout_start", "3"], "none": ["--dropout", "0"],
            "always": ["--dropout", "0.3"]}
    loss = {}
    for name, flags in runs.items():
        assert train_main(["--data", str(builtin_data), "--out", str(tmp_path / name), *common, *flags]) == 0
        loss[name] = [v for _, v in records(tmp_path / name, "loss")]
    assert loss["late"][:3] == loss["none"][:3] and loss["late"][3] != loss["none"][3]
    assert loss["always"][0] != loss["none"][0]


def test_sample_export_and_load_model_take_the_ema_weights_when_present(tmp_path, capsys):
    from storyllama.export import export, to_hf_state_dict
    from storyllama.sample import main as sample_main

    raw, ema = tiny_model(seed=0), tiny_model(seed=1)
    run, ckpt = save_checkpoint(tmp_path, raw)
    checkpoint.save(run, 11, raw, None, {"step": 11}, data_dir=tmp_path / "data", ema=ema)
    for weights, want in (("auto", ema), ("ema", ema), ("raw", raw)):
        got, _ = checkpoint.load_model(run, weights=weights)
        for k, v in want.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), (weights, k)
    # a checkpoint without EMA weights: auto means raw, ema is a clear error
    got, _ = checkpoint.load_model(ckpt)
    assert torch.equal(got.tok_embeddings.weight, raw.tok_embeddings.weight)
    with pytest.raises(checkpoint.CheckpointError, match="no EMA weights"):
        checkpoint.load_model(ckpt, weights="ema")

    out = export(run, tmp_path / "hf")
    exported = load_file(str(out / "model.safetensors"))
    expected = to_hf_state_dict({k: v.detach() for k, v in ema.state_dict().items()}, ema.cfg)
    assert set(exported) == set(expected)
    for k in exported:
        assert torch.equal(exported[k], expected[k]), k

    capsys.readouterr()
    assert sample_main(["--run", str(run), "--max_new_tokens", "2", "--temperature", "0"]) == 0
    assert "sampling from the EMA weights" in capsys.readouterr().err
    assert sample_main(["--run", str(run), "--max_new_tokens", "2", "--temperature", "0", "--weights", "raw"]) == 0
    assert "EMA" not in capsys.readouterr().err
