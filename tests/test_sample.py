"""The sampler: the KV cache gives the tokens of recomputing the whole sequence, batches of different
prompt lengths give each prompt's own tokens, the sampling controls do what they say, and bin/sample
runs end to end on a saved checkpoint."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import EOT_ID, N_VOCAB, save_checkpoint, tiny_model

from storyllama.config import SampleConfig
from storyllama.sample import (
    TextStream,
    apply_repetition_penalty,
    generate,
    generate_recompute,
    main,
)

REPO = Path(__file__).resolve().parent.parent
GREEDY = SampleConfig(max_new_tokens=24, temperature=0.0)
PROMPTS = [[72, 101, 108, 108, 111], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 13, 200, 13]]


@torch.no_grad()
def greedy_by_recompute(model, prompt: list[int], n: int) -> list[int]:
    """The plainest reference: the whole sequence through the model, argmax over the tokenizer's ids."""
    seq = torch.tensor([prompt])
    for _ in range(n):
        logits = model(seq)[0, -1, :N_VOCAB]
        seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_cache_equals_recompute(model, prompt):
    got = generate(model, [prompt], GREEDY, None, N_VOCAB)[0]
    assert got == greedy_by_recompute(model, prompt, GREEDY.max_new_tokens)
    assert len(set(got)) > 3  # the test model does not just repeat one token


def test_batch_of_different_lengths_equals_each_prompt_alone(model):
    batch = generate(model, PROMPTS, GREEDY, None, N_VOCAB)
    for prompt, row in zip(PROMPTS, batch):
        assert row == generate(model, [prompt], GREEDY, None, N_VOCAB)[0]
        assert row == greedy_by_recompute(model, prompt, GREEDY.max_new_tokens)


def test_prefill_logits_of_padded_rows_match_unpadded(model):
    """Left padding changes nothing numerically beyond float rounding (positions and masks per row)."""
    from storyllama.sample import _left_pad, prefill

    idx, pad = _left_pad(PROMPTS, torch.device("cpu"))
    model.setup_caches(len(PROMPTS), idx.shape[1] + 1)
    try:
        with torch.no_grad():
            logits = prefill(model, idx, pad, N_VOCAB)
    finally:
        model.clear_caches()
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            expected = model(torch.tensor([p]))[0, -1, :N_VOCAB]
        torch.testing.assert_close(logits[i], expected, rtol=1e-5, atol=1e-5)


def test_fixed_seed_reproduces_and_matches_recompute(model):
    cfg = SampleConfig(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.2, seed=123)
    a = generate(model, [PROMPTS[0]], cfg, None, N_VOCAB)
    assert a == generate(model, [PROMPTS[0]], cfg, None, N_VOCAB)
    assert a != generate(model, [PROMPTS[0]], replace(cfg, seed=124), None, N_VOCAB)
    assert a != generate(model, [PROMPTS[0]], GREEDY, None, N_VOCAB)[:20]
    # the cache-free reference draws the same random numbers, so it samples the same story
    assert a == generate_recompute(model, [PROMPTS[0]], cfg, None, N_VOCAB)


@pytest.mark.parametrize("filt", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_equal_greedy(model, filt):
    cfg = SampleConfig(max_new_tokens=20, temperature=1.5, seed=0, **filt)
    batch = PROMPTS[:3]
    assert generate(model, batch, cfg, None, N_VOCAB) == generate(model, batch, replace(GREEDY, max_new_tokens=20),
                                                                  None, N_VOCAB)


def test_repetition_penalty_formula_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 0.0], [4.0, -2.0, 1.0, 1.0, -0.5]])
    presence = torch.tensor([[True, True, False, False, True], [False, True, True, False, True]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 0.0], [4.0, -4.0, 0.5, 1.0, -1.0]])
    torch.testing.assert_close(apply_repetition_penalty(logits, presence, 2.0), expected)


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 12))
    logits = torch.randn(3, 50)
    presence = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, presence, 1.3), expected)


def test_repetition_penalty_discourages_repeats(model):
    base = generate(model, PROMPTS[:2], replace(GREEDY, max_new_tokens=40), None, N_VOCAB)
    penalized = generate(model, PROMPTS[:2], replace(GREEDY, max_new_tokens=40, repetition_penalty=5.0), None,
                         N_VOCAB)
    for b, p, prompt in zip(base, penalized, PROMPTS):
        assert len(set(p + prompt)) > len(set(b + prompt))


def test_each_row_stops_at_its_first_eot(model):
    rows = generate(model, PROMPTS[:2], GREEDY, None, N_VOCAB)
    # An "EOT" id that row 0 produces early and row 1 later or never, so the rows stop apart.
    first = {t: r.index(t) for r in rows[:1] for t in r}
    eot = next(t for t, i in sorted(first.items(), key=lambda kv: kv[1])
               if t not in rows[1][:i + 3])
    stopped = generate(model, PROMPTS[:2], GREEDY, eot, N_VOCAB)
    for full, cut in zip(rows, stopped):
        assert cut == (full[:full.index(eot)] if eot in full else full)
    assert len(stopped[0]) < len(stopped[1])


def test_generation_ends_when_every_row_is_done(model):
    row = generate(model, [PROMPTS[0]], GREEDY, None, N_VOCAB)[0]
    i = next(i for i in range(1, len(row)) if row[i] not in row[:i])  # an id first produced at step i
    stats: dict = {}
    out = generate(model, [PROMPTS[0]], replace(GREEDY, max_new_tokens=50), row[i], N_VOCAB, stats=stats)
    assert out == [row[:i]]
    assert stats["new_tokens"] <= i + 1 + 8  # the done mask is read every few steps, not at the end


def test_padded_vocab_ids_are_never_sampled():
    model = tiny_model()
    with torch.no_grad():
        pad_rows = model.output.weight[N_VOCAB:]  # (63, dim): logits 10 * h_j, far above the real ids' logits
        pad_rows.copy_(10.0 * torch.eye(pad_rows.shape[0], pad_rows.shape[1]))
        assert model(torch.tensor([PROMPTS[0]]))[0, -1].argmax() >= N_VOCAB
    for cfg in (GREEDY, SampleConfig(max_new_tokens=24, temperature=1.0, seed=0)):
        for row in generate(model, PROMPTS, cfg, None, N_VOCAB):
            assert max(row) < N_VOCAB


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"50 tokens \+ 20 new tokens = 70 tokens exceeds the model's context of "
                                         r"64 tokens; set --max_new_tokens to at most 14"):
        generate(model, [[1] * 50], replace(GREEDY, max_new_tokens=20), None, N_VOCAB)
    with pytest.raises(ValueError, match="shorten the prompt"):
        generate(model, [[1] * 70], replace(GREEDY, max_new_tokens=1), None, N_VOCAB)


def test_compiled_decode_step_gives_the_eager_tokens_and_follows_weight_updates():
    model = tiny_model()
    cfg = SampleConfig(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=5)
    eager = generate(model, PROMPTS, cfg, None, N_VOCAB)
    assert generate(model, PROMPTS, replace(cfg, compile=True), None, N_VOCAB) == eager
    # The compiled step reads the weights live: an in-place update (an optimizer step) is seen.
    with torch.no_grad():
        model.output.weight.mul_(-1.0)
    eager2 = generate(model, PROMPTS, cfg, None, N_VOCAB)
    assert eager2 != eager
    assert generate(model, PROMPTS, replace(cfg, compile=True), None, N_VOCAB) == eager2


@pytest.mark.parametrize("compile", [False, True])
def test_prepared_model_samples_the_same_and_trains_the_same(compile):
    from storyllama.cpu_decode import PackedLinear, prepare_for_decoding

    model = tiny_model()
    cfg = replace(GREEDY, compile=compile)
    before, state = generate(model, PROMPTS, cfg, None, N_VOCAB), model.state_dict()
    idx = torch.tensor([PROMPTS[2]])
    loss = model(idx[:, :-1], idx[:, 1:])
    prepare_for_decoding(model, min_bytes=0)  # pack every matrix of the tiny model
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 14  # 7 per layer, and the head:
    assert model._packed_head is not None
    assert generate(model, PROMPTS, cfg, None, N_VOCAB) == before  # oneDNN's sums differ only in rounding
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(idx[:, :-1], idx[:, 1:]), loss)  # with gradients: plain F.linear
    # a weight changed in place (an optimizer step) is repacked, not served stale
    with torch.no_grad():
        model.lm_head_weight.mul_(-1.0)
        for layer in model.layers:
            layer.feed_forward.w2.weight.mul_(-2.0)
    after = generate(model, PROMPTS, cfg, None, N_VOCAB)
    assert after != before
    assert after == [greedy_by_recompute(model, p, GREEDY.max_new_tokens) for p in PROMPTS]


def test_bfloat16_weights_keep_fp32_rope_and_sample_valid_tokens(saved):
    from storyllama.sample import load_for_sampling

    model, enc, _ = load_for_sampling(str(saved[1]), torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope_cos.dtype == torch.float32  # model.to(bfloat16) would have rounded the RoPE tables
    out = generate(model, PROMPTS, GREEDY, None, enc.n_vocab)
    assert all(len(r) == GREEDY.max_new_tokens and max(r) < N_VOCAB for r in out)


def test_stream_prints_only_complete_utf8():
    written: list[str] = []
    stream = TextStream(lambda t: bytes([t]), written.append)
    for b in "é, ok ☃".encode():
        stream.feed(b)
    stream.close()
    assert "".join(written) == "é, ok ☃"
    assert all("\ufffd" not in w for w in written)  # never half a character
    assert written[0] == "é"


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_model())


def test_bin_sample_streams_a_story(saved):
    run, _ = saved
    res = subprocess.run([sys.executable, str(REPO / "bin" / "sample"), "--run", str(run), "--prompt",
                          "Once upon a time", "--max_length", "30", "--temperature", "0.8", "--seed", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Once upon a time") and len(res.stdout) > len("Once upon a time")
    assert "tokens/s" in res.stderr


def test_sample_main_batches_prompts_and_samples(saved, capsys):
    _, ckpt = saved
    argv = ["--checkpoint", str(ckpt), "--prompt", "Once", "A cat sat", "--max_new_tokens", "10",
            "--num_samples", "2", "--temperature", "0.7", "--top_k", "20", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for header in ("prompt 1, sample 1", "prompt 1, sample 2", "prompt 2, sample 1", "prompt 2, sample 2"):
        assert header in out
    assert main(argv) == 0
    assert capsys.readouterr().out == out  # --seed reproduces
    assert main([*argv[:-1], "4"]) == 0
    assert capsys.readouterr().out != out


def test_sample_main_greedy_matches_generate(saved, capsys):
    """The CLI prints the prompt followed by the tokens generate() gives for the encoded prompt."""
    from storyllama.checkpoint import load_model
    from storyllama.data_prep.tokenizer import load_encoding

    _, ckpt = saved
    assert main(["--checkpoint", str(ckpt), "--prompt", "Hi", "--max_new_tokens", "12", "--temperature", "0"]) == 0
    model, _ = load_model(ckpt)
    enc = load_encoding(ckpt)
    ids = generate(model, [enc.encode("Hi")], replace(GREEDY, max_new_tokens=12), EOT_ID, N_VOCAB)[0]
    assert capsys.readouterr().out == "Hi" + enc.decode(ids) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/nowhere"], "no complete checkpoint"),
    (["--run", "{tmp}/partial"], "incomplete: model_config.json is missing"),
    (["--checkpoint", "{ckpt}", "--top_p", "2"], "--top_p: must be a finite number in (0, 1], got '2'"),
    (["--checkpoint", "{ckpt}", "--dtype", "float16"], "--dtype must be one of float32, bfloat16"),
    (["--checkpoint", "{ckpt}", "--max_length", "100"], "exceeds the model's context of 64 tokens"),
    (["--checkpoint", "{ckpt}", "--run", "{tmp}"], "not allowed with argument"),
    (["--prompt", "x"], "one of the arguments --run --checkpoint is required"),
])
def test_sample_errors_are_one_line_exit_2(saved, tmp_path, capsys, args, message):
    _, ckpt = saved
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model.safetensors").write_bytes(b"")
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in args]
    try:
        rc = main(argv, prog="bin/sample")
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and err.startswith("bin/sample: error:"), err


# -- bad input to the real tool: one line on stderr, no traceback (issue 15) -------------------------------
def run_bin_sample(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bin" / "sample"), *args], capture_output=True, text=True,
                          timeout=120, **kw)


@pytest.mark.parametrize("flag", ["--temperature", "--top_p", "--repetition_penalty"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_sampling_knob_is_an_error_naming_the_flag(flag, value):
    with pytest.raises(ValueError, match=f"{flag} must be a finite number"):
        SampleConfig(**{flag[2:]: float(value)})


def test_bin_sample_nan_temperature_is_one_line_exit_2(saved):
    res = run_bin_sample("--run", str(saved[0]), "--temperature", "nan")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "--temperature: must be a finite number" in res.stderr, res.stderr


@pytest.mark.parametrize("device, message", [
    pytest.param("cuda", "no usable CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ("tpu", "--device"),
    ("cuda:x", "is not a device name"),
])
def test_bin_sample_bad_device_is_one_line_exit_2(saved, device, message):
    res = run_bin_sample("--run", str(saved[0]), "--device", device, "--max_length", "5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


@pytest.mark.parametrize("prompts", [["Once upon a time"], ["Once", "A cat"]])
def test_bin_sample_into_a_closed_pipe_ends_quietly(saved, prompts):
    """`bin/sample ... | head -1` where head has gone: the reader's end is closed before the first write."""
    import os

    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write to stdout fails with EPIPE
    try:
        res = subprocess.run([sys.executable, str(REPO / "bin" / "sample"), "--run", str(saved[0]), "--prompt",
                              *prompts, "--max_length", "20", "--seed", "1"], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr


def test_bin_sample_piped_into_head_prints_one_line(saved):
    res = subprocess.run(f"'{sys.executable}' '{REPO / 'bin' / 'sample'}' --run '{saved[0]}' --prompt a b c "
                         "--num_samples 4 --max_length 40 --seed 1 | head -1", shell=True, capture_output=True,
                         text=True, timeout=120)
    assert res.stdout.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr


def test_bin_sample_config_not_matching_weights_is_one_line_exit_2(tmp_path):
    import json

    _, ckpt = save_checkpoint(tmp_path, tiny_model())
    cfg_file = ckpt / "model_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "dim": 2 * cfg["dim"]}))
    res = run_bin_sample("--checkpoint", str(ckpt), "--max_length", "5")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("bin/sample: error:"), res.stderr


def test_prepared_model_wraps_linears_explicitly():
    """prepare_for_decoding swaps no __class__: each packed Linear sits inside a PackedLinear that holds it
    and shares its weight Parameter."""
    from storyllama.cpu_decode import PackedLinear, packing_supported, prepare_for_decoding

    if not packing_supported(torch.float32):
        pytest.skip("oneDNN cannot pack fp32 weights here")
    model = tiny_model()
    linear = model.layers[0].attention.wq
    params = dict(model.named_parameters())
    prepare_for_decoding(model, min_bytes=0)
    wrapper = model.layers[0].attention.wq
    assert type(wrapper) is PackedLinear and type(linear) is torch.nn.Linear
    assert wrapper.unwrap() is linear and wrapper.weight is linear.weight
    assert dict(model.named_parameters()) == params  # same names, same Parameter objects


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_samples_like_the_plain_one_in_each_dtype(dtype):
    """bf16 included: where this CPU's oneDNN cannot pack bf16 (no AVX512-BF16-era ISA) the model stays as
    it is instead of failing at the first matmul."""
    from storyllama.cpu_decode import prepare_for_decoding

    plain, prepared = tiny_model(), tiny_model()
    for m in (plain, prepared):
        for p in m.parameters():
            p.data = p.data.to(dtype)
    prepare_for_decoding(prepared, min_bytes=0)
    assert generate(prepared, PROMPTS, GREEDY, None, N_VOCAB) == generate(plain, PROMPTS, GREEDY, None, N_VOCAB)


def test_cache_buckets():
    from storyllama.sample import cache_slots

    assert [cache_slots(n, 512) for n in (1, 64, 65, 200, 272, 512)] == [64, 64, 128, 256, 512, 512]
    assert cache_slots(100, 96) == 96  # capped at the context


def test_compiled_sampling_reuses_one_graph_and_one_cache_across_prompt_lengths():
    """Ten prompts of ten lengths, compile=True: the cache storage is the same on every call and the decode
    step compiles once (before: a fresh cache sized to each prompt, so a new graph per length)."""
    from torch._dynamo.utils import counters

    model = tiny_model()
    cfg = SampleConfig(max_new_tokens=6, temperature=0.0, compile=True)
    torch._dynamo.reset()
    counters.clear()
    ptrs: set[int] = set()
    for n in range(1, 11):
        prompt = list(range(3, 3 + 2 * n, 2))
        out = generate(model, [prompt], cfg, None, N_VOCAB,
                       on_token=lambda ids: ptrs.add(model.layers[0].attention.cache.k.data_ptr()))
        if n in (1, 10):
            assert out[0] == greedy_by_recompute(model, prompt, cfg.max_new_tokens)
    assert len(ptrs) == 1
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert all(layer.attention.cache is None for layer in model.layers)  # detached: training is unaffected


def test_load_for_sampling_takes_triton_ops_on_cuda_and_reference_ops_on_cpu(saved, monkeypatch):
    """bin/sample's model uses kernels.resolve_backend("auto", device): Triton on CUDA (recorded here by
    standing in for load_model, so no GPU is needed), the reference ops on CPU."""
    from storyllama import checkpoint
    from storyllama.kernels._triton_utils import HAS_TRITON
    from storyllama.sample import load_for_sampling

    if not HAS_TRITON:
        pytest.skip("triton is not installed: auto resolves to the reference ops everywhere")
    asked: dict[str, str] = {}
    real = checkpoint.load_model

    def recording_load_model(path, device="cpu", dtype=None, kernels="reference", weights="auto"):
        asked[torch.device(device).type] = kernels
        return real(path, device="cpu", kernels="reference")

    monkeypatch.setattr(checkpoint, "load_model", recording_load_model)
    for device in ("cpu", "cuda"):
        load_for_sampling(str(saved[1]), torch.device(device), torch.float32)
    assert asked == {"cpu": "reference", "cuda": "triton"}
    monkeypatch.undo()
    model, _, _ = load_for_sampling(str(saved[1]), torch.device("cpu"), torch.float32)
    assert model.ops.backend == "reference" and all(layer.attention.ops is model.ops for layer in model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_the_lean_cpu_decode_step_gives_the_models_logits_and_cache(dtype, packed):
    """cpu_decode.FastDecoder (what eager decoding on the CPU runs) against decode_one_token, the model's own
    forward: the same logits and the same cache writes, at batch 1 and for left-padded rows, through PyTorch's
    matmuls and through oneDNN's packed weights with fused SiLU / residual post-ops; in a fraction of the ops."""
    from storyllama.cpu_decode import fast_decoder, packing_supported, prepare_for_decoding
    from storyllama.sample import decode_one_token, prefill

    if packed and not packing_supported(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU")
    model = tiny_model().to(dtype)
    if packed:
        prepare_for_decoding(model, min_bytes=0)
    dec = fast_decoder(model)
    dec.pack_one_row = packed
    if not packed:
        dec.packing = False
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for pads in ([0], [0, 2, 5]):
        B, P = len(pads), 8
        pad = torch.tensor(pads).view(B, 1)
        idx = torch.randint(0, N_VOCAB, (B, P), generator=torch.Generator().manual_seed(B))
        tok = torch.randint(0, N_VOCAB, (B, 1), generator=torch.Generator().manual_seed(7))
        with torch.inference_mode():
            model.setup_caches(B, 64, dtype=torch.float32)
            prefill(model, idx, pad, N_VOCAB)
            before = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
            with torch.profiler.profile() as ref_prof:
                ref = decode_one_token(model, tok, torch.tensor([P]), pad, N_VOCAB)
            ref_cache = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
            for layer, (k, v) in zip(model.layers, before):
                layer.attention.cache.k.copy_(k)
                layer.attention.cache.v.copy_(v)
            with torch.profiler.profile() as prof:
                got = dec.step(tok, P, pad if any(pads) else None, N_VOCAB)
            got_cache = [(layer.attention.cache.k.clone(), layer.attention.cache.v.clone()) for layer in model.layers]
            model.clear_caches()
        torch.testing.assert_close(got, ref, **tol)
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        for (k, v), (k_ref, v_ref) in zip(got_cache, ref_cache):
            torch.testing.assert_close(k, k_ref, **tol)
            torch.testing.assert_close(v, v_ref, **tol)
        ops, ref_ops = (sum(1 for e in p.events() if e.cpu_parent is None) for p in (prof, ref_prof))
        assert ops <= 0.5 * ref_ops, (ops, ref_ops)  # ops called from Python, views included
