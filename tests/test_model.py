"""The model: shapes and parameter counts, causality, RoPE, GQA, and the whole forward pass against
Hugging Face transformers' LlamaForCausalLM as an independent reference."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from storyllama.config import PRESETS, ModelConfig, preset
from storyllama.hf import hf_config_dict, to_hf_state_dict
from storyllama.model import Llama

SMALL = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, block_size=64, hidden_dim=96)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_matches_formula(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_seed_preset_is_about_50m_with_tied_embeddings():
    cfg = preset("storyllama-88m")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.block_size, cfg.vocab_size) == (
        512, 8, 8, 2, 512, 50304)
    assert 49e6 < cfg.num_params() < 51e6


def test_untied_head_adds_vocab_by_dim():
    tied, untied = ModelConfig(**SMALL), ModelConfig(**SMALL, tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 256 * 64
    assert sum(p.numel() for p in Llama(untied).parameters()) == untied.num_params()


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL)).eval()
    idx = torch.randint(0, 256, (2, 40))
    changed = idx.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :25], b[:, :25], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 25:], b[:, 25:])


# -- document masking ------------------------------------------------------------------------------------
EOT = 255


def test_document_masking_keeps_a_story_apart_from_the_one_before():
    """[random story, EOT, story]: with doc_eot the second story's logits and loss do not depend on the random
    story (without it they do); the first story's do not depend on the second in either case (causality)."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL)).eval()
    story = torch.randint(0, 255, (1, 24))
    windows = []
    for _ in range(2):
        first = torch.randint(0, 255, (1, 16))
        first[0, -1] = EOT
        windows.append(torch.cat([first, story], 1))  # (1, 40): the random part differs
    a, b = (model(w, doc_eot=EOT) for w in windows)
    torch.testing.assert_close(a[:, 16:], b[:, 16:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(windows[0])[:, 16:], model(windows[1])[:, 16:], atol=1e-3)
    later = windows[0].clone()
    later[:, 16:] = torch.randint(0, 255, (1, 24))
    torch.testing.assert_close(model(later, doc_eot=EOT)[:, :16], a[:, :16], rtol=1e-5, atol=1e-5)
    # The loss on the story: the target after the EOT (its first token, predicted across the boundary) is ignored.
    tail = torch.randint(0, 255, (1, 1))
    y = [torch.cat([w[:, 1:], tail], 1) for w in windows]
    for t in y:
        t[:, :15] = -100  # score the second story only, and the EOT's target with it
    la, lb = (model(w, t, doc_eot=EOT) for w, t in zip(windows, y, strict=True))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(windows[0], y[0]), model(windows[1], y[1]), atol=1e-4)


def test_each_story_of_a_packed_window_scores_as_if_it_were_alone():
    """A window of three stories with doc_eot gives each story the logits of that story run alone from position
    0 (RoPE is relative), and the loss is the mean over every target but the one after each EOT."""
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL)).eval()
    lengths = [10, 21, 9]  # each story ends with its EOT; the last one is cut by the window
    parts = [torch.randint(0, 255, (1, n)) for n in lengths]
    for p in parts[:-1]:
        p[0, -1] = EOT
    idx = torch.cat(parts, 1)  # (1, 40)
    targets = torch.randint(0, 255, (1, 40))
    logits = model(idx, doc_eot=EOT)
    starts = [0, 10, 31]
    for p, s in zip(parts, starts, strict=True):
        torch.testing.assert_close(logits[:, s : s + p.shape[1]], model(p), rtol=1e-4, atol=1e-5)
    scored = idx != EOT
    expected = torch.nn.functional.cross_entropy(logits[scored], targets[scored])
    torch.testing.assert_close(model(idx, targets, doc_eot=EOT), expected, rtol=1e-5, atol=1e-6)
    total = model(idx, targets, doc_eot=EOT, reduction="sum")
    torch.testing.assert_close(total, expected * scored.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last_is_eot", [False, True])
def test_document_mask_on_one_story_is_the_causal_path(last_is_eot):
    """One story (an EOT at the end belongs to it): the document-masked model equals SDPA's is_causal path,
    loss and every gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(**SMALL)
    masked, causal = Llama(cfg), Llama(cfg)
    causal.load_state_dict(masked.state_dict())
    idx = torch.randint(0, 255, (3, 33))
    if last_is_eot:
        idx[:, -2] = EOT  # the input before the last: its target (the next story's first token) is ignored
    x, y = idx[:, :-1], idx[:, 1:].clone()
    la = masked(x, y, doc_eot=EOT)
    lb = causal(x, y.masked_fill(x == EOT, -100))
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(masked.named_parameters(), causal.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_doc_eot_does_not_combine_with_a_kv_cache():
    model = Llama(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="doc_eot"):
        model.hidden_states(torch.zeros(1, 4, dtype=torch.long), cache_pos=torch.arange(4), doc_eot=EOT)


def test_rope_scores_depend_only_on_relative_position():
    from storyllama.kernels.rope import rope_cos_sin, rope_reference

    torch.manual_seed(0)
    D = 32
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float64), torch.randn(1, 1, 1, D, dtype=torch.float64)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), D, 10000.0)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), D, 10000.0)
        return (rope_reference(q, cq.double(), sq.double()) * rope_reference(k, ck.double(), sk.double())).sum()

    base = score(7, 3)
    for offset in (1, 10, 200):
        torch.testing.assert_close(score(7 + offset, 3 + offset), base, rtol=1e-6, atol=1e-6)  # cos/sin are fp32
    assert not torch.isclose(score(8, 3), base)  # a different distance gives a different score


def test_gqa_with_all_kv_heads_is_multi_head_attention():
    """n_kv_heads == n_heads: our attention equals textbook multi-head attention with the same weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "n_kv_heads": 4})
    attn = Llama(cfg).layers[0].attention.eval()
    x = torch.randn(2, 10, cfg.dim)
    cos, sin = Llama(cfg).rope_cos[:, :10], Llama(cfg).rope_sin[:, :10]
    from storyllama.kernels.rope import rope_reference

    B, T, H, D = 2, 10, 4, 16
    q = rope_reference(attn.wq(x).view(B, T, H, D), cos, sin).transpose(1, 2)
    k = rope_reference(attn.wk(x).view(B, T, H, D), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, T, H, D).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    expected = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_gqa_shares_kv_heads_across_query_groups():
    """n_kv_heads=2 equals n_kv_heads=4 with each kv head's weights repeated for its query group."""
    torch.manual_seed(0)
    gqa = Llama(ModelConfig(**SMALL)).eval()  # 4 query heads, 2 kv heads
    mha = Llama(ModelConfig(**{**SMALL, "n_kv_heads": 4})).eval()
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            sd[key] = sd[key].view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64)
    mha.load_state_dict(sd)
    idx = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(gqa(idx), mha(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers_llama(tied):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent reference")
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "tie_embeddings": tied, "rope_theta": 500.0})
    ours = Llama(cfg, fused_ce=False).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg))).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg))
    idx = torch.randint(0, 256, (3, 50))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and the loss agrees with transformers' shifted-label loss
    with torch.no_grad():
        hf_loss = hf(idx, labels=idx).loss
        our_loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(our_loss, hf_loss, rtol=1e-5, atol=1e-5)


def test_fused_and_unfused_loss_agree():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL))
    idx = torch.randint(0, 256, (2, 33))
    targets = idx[:, 1:].clone()
    targets[0, :5] = -100  # ignored positions
    losses, grads = [], []
    for fused in (True, False):
        model.fused_ce = fused
        model.zero_grad()
        loss = model(idx[:, :-1], targets)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.tok_embeddings.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_loss_at_init_is_close_to_uniform():
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = Llama(cfg)
    idx = torch.randint(0, cfg.vocab_size, (4, 65))
    loss = model(idx[:, :-1], idx[:, 1:]).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1, loss


def test_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL))
    idx = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2, loss.item()


def test_two_half_batches_accumulate_to_the_full_batch_gradient():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL))
    idx = torch.randint(0, 256, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    model(x, y).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (slice(0, 2), slice(2, 4)):
        (model(x[part], y[part]) / 2).backward()
    for g, p in zip(full, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_context_longer_than_block_size_is_a_clear_error():
    model = Llama(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_config_errors_name_the_option():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(**{**SMALL, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="did you mean storyllama-88m"):
        preset("storyllama-88")


def test_compiled_model_gives_the_eager_loss():
    torch.manual_seed(0)
    model = Llama(ModelConfig(**SMALL))
    idx = torch.randint(0, 256, (2, 33))
    eager = model(idx[:, :-1], idx[:, 1:])
    compiled = torch.compile(model, fullgraph=True)(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# -- which SDPA kernel serves each attention call ----------------------------------------------------------
def _attention_cases(device: str, dropout: float = 0.0, attn_dropout: float = 0.0) -> list[tuple[str, object]]:
    """(name, thunk) for every way the model attends: training fp32 and bf16 (forward + backward, causal, no
    mask, or document-masked) and sampling (prefill and cached decode, both with a mask), on a GQA model
    (4 heads, 2 kv heads)."""
    from storyllama.config import SampleConfig
    from storyllama.sample import generate

    torch.manual_seed(0)
    model = Llama(ModelConfig(**{**SMALL, "dropout": dropout, "attn_dropout": attn_dropout})).to(device)
    idx = torch.randint(0, 256, (2, 33), device=device)

    docs = idx.clone()
    docs[:, 10] = 255  # document masking: two stories in each window

    def train(dtype, doc_eot=None):
        def run():
            x = idx if doc_eot is None else docs
            with torch.autocast(device, dtype, enabled=dtype != torch.float32):
                model.train()(x[:, :-1], x[:, 1:], doc_eot=doc_eot).backward()
        return run

    def sample(prompts):
        return lambda: generate(model.eval(), prompts, SampleConfig(max_new_tokens=4, temperature=0.0), None, 256)

    return [("train-fp32", train(torch.float32)), ("train-bf16", train(torch.bfloat16)),
            ("train-doc-fp32", train(torch.float32, 255)), ("train-doc-bf16", train(torch.bfloat16, 255)),
            ("prefill+decode", sample([[1, 2, 3], [4, 5, 6, 7, 8, 9]])), ("decode-1-token-prompt", sample([[7]]))]


def _every_case_runs_on(backends, device: str, dropout: float = 0.0, attn_dropout: float = 0.0) -> None:
    from torch.nn.attention import sdpa_kernel

    for name, run in _attention_cases(device, dropout, attn_dropout):
        with sdpa_kernel(backends):  # the math kernel is not allowed: "No available kernel" if it were needed
            try:
                run()
            except RuntimeError as e:
                pytest.fail(f"{name}: {e}")


def test_attention_runs_on_the_cpu_flash_kernel():
    """Training with --dropout (the residual stream's) keeps the CPU flash kernel; only --attn_dropout > 0
    needs the math kernel there (no fused CPU kernel drops attention probabilities)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _every_case_runs_on([SDPBackend.FLASH_ATTENTION], "cpu", dropout=0.1)
    _, run = _attention_cases("cpu", attn_dropout=0.1)[0]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError, match="No available kernel"):
        run()


def test_dropout_rates_act_where_they_say():
    """--dropout drops the residual stream (embeddings, block outputs), --attn_dropout the attention
    probabilities; both only in training. Every training SDPA call gets exactly --attn_dropout (0 when only
    --dropout is set), eval calls 0; either rate alone makes the training loss random."""
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    real = F.scaled_dot_product_attention
    calls: list[float] = []

    def sdpa(*a, **k):
        calls.append(k["dropout_p"])
        return real(*a, **k)

    for rates in ({"dropout": 0.3}, {"attn_dropout": 0.3}, {}):
        torch.manual_seed(0)
        model = Llama(ModelConfig(**{**SMALL, **rates}))
        calls.clear()
        with mock.patch.object(F, "scaled_dot_product_attention", sdpa):
            a, b = (model.train()(idx[:, :-1], idx[:, 1:]) for _ in range(2))
            ev = model.eval()(idx[:, :-1], idx[:, 1:])
        assert calls[:2 * SMALL["n_layers"]] == [rates.get("attn_dropout", 0.0)] * (2 * SMALL["n_layers"])
        assert set(calls[2 * SMALL["n_layers"]:]) == {0.0}  # eval
        assert (a != b) == bool(rates), rates
        if not rates:
            torch.testing.assert_close(a, ev)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_runs_on_fused_cuda_kernels():
    from torch.nn.attention import SDPBackend

    _every_case_runs_on([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION], "cuda", dropout=0.1,
                        attn_dropout=0.1)


def test_sdpa_calls_follow_the_cuda_kernel_rules(monkeypatch):
    """CUDA's flash kernel takes enable_gqa but neither a mask nor fp32, its memory-efficient kernel a mask
    and fp32 but not enable_gqa: a call outside both falls back to the O(T^2)-memory math kernel. The
    model's calls are recorded on CPU with the CUDA rules applied (the CPU's flash kernel takes them all)."""
    import torch.nn.functional as F

    import storyllama.cpu_decode as cpu_decode
    import storyllama.model as model_mod

    monkeypatch.setattr(model_mod, "_cuda_rules", lambda q: True, raising=False)
    # the model's own calls: the lean CPU decode step (cpu_decode.FastDecoder) never runs on CUDA
    monkeypatch.setattr(cpu_decode, "USE_FAST_DECODER", False)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa, q.shape[1] == k.shape[1], q.dtype))
        return real(q, k, v, attn_mask, *args, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for _, run in _attention_cases("cpu"):
        run()
    assert any(masked for masked, *_ in calls) and any(gqa for _, gqa, *_ in calls)
    assert {dtype for *_, dtype in calls} == {torch.float32, torch.bfloat16}
    for masked, gqa, same_heads, dtype in calls:
        assert not (masked and gqa), "mask + enable_gqa: no fused CUDA kernel takes it"
        assert not (dtype == torch.float32 and gqa), "fp32 + enable_gqa: no fused CUDA kernel takes it"
        assert gqa or same_heads or masked  # k, v (B, Hkv, S, D) against q folded to (B, Hkv, rep * T, D)


@pytest.mark.parametrize("T, S, masked", [(5, 5, False), (5, 9, True), (1, 9, True)])
@pytest.mark.parametrize("B_mask", [1, 3])
@pytest.mark.parametrize("cuda_rules", [False, True])
def test_attend_equals_textbook_grouped_query_attention(monkeypatch, T, S, masked, B_mask, cuda_rules):
    """Every call layout (enable_gqa; k, v expanded; query groups folded) gives textbook GQA."""
    import storyllama.model as model_mod
    from storyllama.model import attend

    monkeypatch.setattr(model_mod, "_cuda_rules", lambda q: cuda_rules)
    torch.manual_seed(0)
    B, H, Hkv, D = 3, 6, 2, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    if masked:
        mask = torch.rand(B_mask, 1, T, S) < 0.6
        mask[..., 0] = True  # every query attends somewhere
    else:
        mask = torch.ones(T, S, dtype=torch.bool).tril()[None, None]
    kk, vv = k.double().repeat_interleave(H // Hkv, 1), v.double().repeat_interleave(H // Hkv, 1)
    scores = (q.double() @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~mask, float("-inf"))
    expected = scores.softmax(-1) @ vv
    torch.testing.assert_close(attend(q, k, v, mask if masked else None, 0.0).double(), expected, rtol=1e-5,
                               atol=1e-5)
