"""Beam search on the KV cache: one beam is greedy, more beams find sequences at least as likely as greedy's,
the cached search equals one that recomputes every beam's whole sequence, a search wide enough to keep every
prefix finds the most likely sequence, beams stop at end-of-text, and bin/sample runs it."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_checkpoint import EOT_ID, N_VOCAB, save_checkpoint, tiny_model

from storyllama.config import SampleConfig
from storyllama.sample import beam_search, beam_search_recompute, generate

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [[72, 101, 108, 108, 111], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def model():
    # One intra-op thread: on a busy 2-core machine a model this small steps several times faster so.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@torch.no_grad()
def logprob_of(model, prompt: list[int], tokens: list[int], vocab: int = N_VOCAB) -> float:
    """Sum of log p(token | everything before) under the model, over the tokenizer's vocabulary."""
    seq = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(seq)[0, :, :vocab].float(), dim=-1)  # (T, V)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("eot,alpha", [(None, 1.0), (EOT_ID, 0.0)])
def test_one_beam_is_greedy(model, prompt, eot, alpha):
    n = 20
    greedy = generate(model, [prompt], SampleConfig(max_new_tokens=n, temperature=0.0), eot, N_VOCAB)[0]
    best = beam_search(model, prompt, SampleConfig(max_new_tokens=n, num_beams=1, length_penalty=alpha), eot,
                       N_VOCAB)[0]
    assert best.tokens == greedy


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("beams", [2, 4])
def test_more_beams_are_at_least_as_likely_as_greedy(model, prompt, beams):
    n = 16
    greedy = generate(model, [prompt], SampleConfig(max_new_tokens=n, temperature=0.0), None, N_VOCAB)[0]
    hyps = beam_search(model, prompt, SampleConfig(max_new_tokens=n, num_beams=beams, length_penalty=0.0), None,
                       N_VOCAB)
    assert len(hyps) == beams and all(len(h.tokens) == n for h in hyps)
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    best = hyps[0]
    # the reported sum is the model's own log-probability of the sequence
    assert best.logprob == pytest.approx(logprob_of(model, prompt, best.tokens), abs=1e-3)
    assert best.logprob >= logprob_of(model, prompt, greedy) - 1e-4


@pytest.mark.parametrize("prompt,alpha,penalty", [(PROMPTS[0], 1.0, 1.0), (PROMPTS[1], 0.0, 1.3),
                                                 (PROMPTS[2], -0.5, 1.0)])
def test_cached_beam_search_equals_recompute(model, prompt, alpha, penalty):
    cfg = SampleConfig(max_new_tokens=20, num_beams=3, length_penalty=alpha, repetition_penalty=penalty)
    cached = beam_search(model, prompt, cfg, EOT_ID, N_VOCAB)
    ref = beam_search_recompute(model, prompt, cfg, EOT_ID, N_VOCAB)
    assert [h.tokens for h in cached] == [h.tokens for h in ref]
    for a, b in zip(cached, ref):
        assert a.score == pytest.approx(b.score, abs=1e-4) and a.stop == b.stop


def test_wide_beam_finds_the_most_likely_sequence(model):
    """With a vocabulary of 6 and 36 beams every prefix of 2 tokens is kept, so the best 3-token sequence is
    found: compare with all 216 sequences scored one by one."""
    vocab, n, prompt = 6, 3, [3, 1, 4]
    best = beam_search(model, prompt, SampleConfig(max_new_tokens=n, num_beams=vocab ** (n - 1), length_penalty=0.0),
                       None, vocab)[0]
    scored = {seq: logprob_of(model, prompt, list(seq), vocab) for seq in itertools.product(range(vocab), repeat=n)}
    top = max(scored, key=scored.get)
    assert best.tokens == list(top)
    assert best.logprob == pytest.approx(scored[top], abs=1e-4)


def test_beams_stop_at_end_of_text(model):
    """A model whose head favours EOT after a few tokens: hypotheses end there, EOT excluded, stop 'eot'."""
    m = tiny_model(seed=1)
    with torch.no_grad():
        m.output.weight[EOT_ID] += 0.2 * m.norm.weight.new_ones(m.cfg.dim)
    hyps = beam_search(m, [5, 6], SampleConfig(max_new_tokens=40, num_beams=4), EOT_ID, N_VOCAB)
    assert any(h.stop == "eot" for h in hyps)
    for h in hyps:
        assert EOT_ID not in h.tokens
        assert (h.stop == "eot") == (len(h.tokens) < 40)


def test_bin_sample_beam_search(tmp_path):
    run, _ = save_checkpoint(tmp_path, tiny_model())
    out = subprocess.run([sys.executable, str(REPO / "bin/sample"), "--run", str(run), "--prompt", "Once",
                          "--max_new_tokens", "12", "--num_beams", "3", "--num_samples", "2",
                          "--length_penalty", "0.5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--- prompt 1, beam") == 2 and "stop:" in out.stdout
    bad = subprocess.run([sys.executable, str(REPO / "bin/sample"), "--run", str(run), "--num_beams", "2",
                          "--num_samples", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "cannot exceed --num_beams" in bad.stderr
