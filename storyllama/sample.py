"""Sampling: prefill the prompt(s) once, then decode one token a step against a preallocated KV cache.

Several prompts of different lengths share one batch by left padding. With P the longest prompt and
pad[i] = P - len(prompt i), cache slot s of row i holds the token at position s - pad[i]; slots
below pad[i] hold padding that no real token attends to. The cache has P + max_new_tokens slots
(checked against the model's context before anything runs) rounded up to a power of two from 64, capped
at the context (`cache_slots`); the model keeps it between calls (Llama.setup_caches), so calls with the
same batch size and bucket reuse the same storage.

Per decoding step the work is one `decode_one_token` (the model on one token per row, logits over
the tokenizer's vocabulary only) and `sample_one_no_sync` (repetition penalty, temperature, top-k,
top-p, then the exponential race `argmax(p / E)`, E ~ Exp(1) drawn from a seeded torch.Generator
outside the step). Nothing in the step reads a value back to the host; finished rows are tracked
in a `done` mask on the device and checked every few steps (or every step when streaming). With
`compile=True` the step is compiled once per (batch size, cache bucket, sampling settings), static
shapes, and reused by later calls (CUDA graphs on CUDA, replayed on the same cache addresses). Dynamo
keeps at most torch._dynamo.config.cache_size_limit (8) graphs of the step; past that it runs eagerly.

`generate_recompute` is the slow reference without a cache (the whole sequence through the model for
every token, as the seed project did); it draws the same random numbers, so the two agree token for
token.

Public API:
    generate(model, prompt_ids, cfg, eot_id, vocab_limit, on_token=None, stats=None) -> list[list[int]]
    generate_recompute(model, prompt_ids, cfg, eot_id, vocab_limit) -> list[list[int]]
    beam_search(model, prompt, cfg, eot_id, vocab_limit, on_step=None, stats=None) -> list[Hypothesis]
    beam_search_recompute(model, prompt, cfg, eot_id, vocab_limit) -> list[Hypothesis]   (its reference)
    prepare_for_decoding(model) -> model      (storyllama.cpu_decode: oneDNN-packed weights; bin/sample applies it)
    request_prompt(enc, words, features, summary, story_start) -> ids   (a story request, the training template)
    prefill, decode_one_token, sample_one_no_sync, apply_repetition_penalty
    main(argv) -> exit code      (bin/sample)
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from storyllama.checkpoint import add_trust_flag
from storyllama.config import OneLineErrorParser, SampleConfig, add_dataclass_args, given
from storyllama.cpu_decode import fast_decoder, lm_head_logits, prepare_for_decoding
from storyllama.devices import resolve_device, resolve_dtype
from storyllama.model import Llama

CHECK_DONE_EVERY = 8  # decoding steps between host reads of the `done` mask (when not streaming)


@dataclass(frozen=True)
class SamplingParams:
    """What `sample_one_no_sync` needs of a SampleConfig; constants of a compiled step."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def of(cls, cfg: SampleConfig) -> SamplingParams:
        return cls(cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# -- the model side: prefill and one decoding step ----------------------------------------------------
def _cache_len(model: Llama) -> int:
    cache = model.layers[0].attention.cache
    if cache is None:
        raise RuntimeError("the model has no KV cache: call model.setup_caches(batch, max_len) first")
    return cache.k.shape[2]


def prefill(model: Llama, idx: torch.Tensor, pad: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """Run left-padded prompts idx (B, P) through the model, filling cache slots 0..P-1.

    pad (B, 1): padding tokens at the start of each row. Returns the logits (B, vocab_limit) of the
    last prompt token of each row.
    """
    B, P = idx.shape
    S = _cache_len(model)
    slots = torch.arange(S, device=idx.device)  # (S,)
    t = slots[:P, None]  # (P, 1): the query slots
    real = slots[None, None, :] >= pad[:, :, None]  # (B, 1, S): slots holding real tokens
    # Causal over slots, real keys only; a padding query attends to itself alone, so every row of the
    # mask has a True (no NaN from an all-masked softmax) and padding never reaches a real token.
    mask = (slots[None] <= t) & (real | (slots[None] == t))  # (B, P, S)
    positions = (slots[None, :P] - pad).clamp(min=0)  # (B, P): RoPE position of each slot
    h = model.hidden_states(idx, positions=positions, cache_pos=slots[:P], attn_mask=mask[:, None])
    return lm_head_logits(model, h[:, -1], vocab_limit)


def decode_one_token(model: Llama, tok: torch.Tensor, cache_pos: torch.Tensor, pad: torch.Tensor,
                     vocab_limit: int) -> torch.Tensor:
    """One token per row tok (B, 1) into cache slot cache_pos (1,); returns logits (B, vocab_limit).

    Static shapes: the mask covers every cache slot (B, 1, 1, S), with the slots not yet written
    and each row's padding masked out, so one compiled graph serves every step.
    """
    S = _cache_len(model)
    slots = torch.arange(S, device=tok.device)  # (S,)
    mask = (slots >= pad) & (slots <= cache_pos)  # (B, S)
    positions = cache_pos[None] - pad  # (B, 1)
    h = model.hidden_states(tok, positions=positions, cache_pos=cache_pos, attn_mask=mask[:, None, None, :])
    return lm_head_logits(model, h[:, -1], vocab_limit)


# -- the sampling side ---------------------------------------------------------------------------------
def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: float) -> torch.Tensor:
    """For tokens already present (presence (B, V) bool): divide positive logits by `penalty`, multiply
    negative ones by it (CTRL's penalty, as in transformers). logits (B, V) -> (B, V)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(presence, penalized, logits)


def sample_one_no_sync(logits: torch.Tensor, params: SamplingParams, presence: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V), on the device, without reading anything back to the host.

    Order: repetition penalty, then greedy argmax (temperature 0), or temperature, top-k, top-p and a
    draw. noise (B, V) ~ Exp(1): argmax(p_i / E_i) picks token i with probability p_i (the exponential
    race), so the draw is one argmax and the random numbers come from the caller's generator.
    """
    if params.repetition_penalty != 1.0 and presence is not None:
        logits = apply_repetition_penalty(logits, presence, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    neg_inf = float("-inf")  # filtered tokens; the most likely token always survives both filters
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, neg_inf)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
        # Keep the smallest set whose mass reaches top_p (the most likely token always stays).
        sorted_logits = sorted_logits.masked_fill(before >= params.top_p, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    # p_i / E_i in log space: log p_i - log E_i; the softmax's normaliser is common to all i.
    return (logits - noise.log()).argmax(dim=-1)


def _decode_step(model: Llama, tok: torch.Tensor, cache_pos: torch.Tensor, pad: torch.Tensor,
                 presence: torch.Tensor | None, noise: torch.Tensor | None, done: torch.Tensor,
                 params: SamplingParams, eot_id: int, vocab_limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_one_token + sample_one_no_sync + the done mask: the unit that `--compile` compiles.
    Pure apart from the KV cache write, so CUDA graphs can replay it."""
    logits = decode_one_token(model, tok, cache_pos, pad, vocab_limit)
    nxt = sample_one_no_sync(logits, params, presence, noise)  # (B,)
    nxt = torch.where(done, eot_id, nxt)  # finished rows keep emitting EOT
    return nxt, done | (nxt == eot_id)


_compiled_steps: dict[str, Callable] = {}
MIN_CACHE_SLOTS = 64  # the smallest cache bucket


def cache_slots(needed: int, block_size: int) -> int:
    """Cache length for `needed` slots: the next power of two from MIN_CACHE_SLOTS up, capped at block_size.

    Prompts of every length then share a few cache shapes (64, 128, 256, 512 for the 512-token context),
    so the compiled decode step has a few graphs per batch size, not one per prompt length; the unused
    slots are masked out (at most as many again as used, read by attention only)."""
    slots = MIN_CACHE_SLOTS
    while slots < needed:
        slots *= 2
    return min(slots, block_size)


def _compiled_decode_step(device: torch.device) -> Callable:
    """torch.compile of _decode_step with static shapes: one graph per (batch, cache bucket, sampling
    settings), reused across generate calls (the model keeps its caches, see Llama.setup_caches).

    CUDA: mode="reduce-overhead", the step replayed as a CUDA graph. CPU: inductor's default mode with its
    C++ wrapper, which fuses the elementwise work (norms, RoPE, masks, sampling) around the matmuls and
    removes most of the per-op dispatch. The weights are graph inputs, read live: a model trained further
    samples correctly.
    """
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _compiled_steps:
        if mode == "default":
            # C++ wrapper code: less Python per step (benchmarks/test_bench_sample.py measures it).
            _compiled_steps[mode] = torch.compile(_decode_step, dynamic=False, fullgraph=True,
                                                  options={"cpp_wrapper": True})
        else:
            _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, dynamic=False, fullgraph=True)
    return _compiled_steps[mode]


# -- the loop --------------------------------------------------------------------------------------------
def check_fits(model: Llama, prompt_len: int, max_new_tokens: int) -> None:
    block = model.cfg.block_size
    if prompt_len + max_new_tokens > block:
        room = block - prompt_len
        fix = (f"set --max_new_tokens to at most {room} or shorten the prompt" if room > 0
               else f"shorten the prompt to under {block} tokens")
        raise ValueError(f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens = "
                         f"{prompt_len + max_new_tokens} tokens exceeds the model's context of {block} tokens; "
                         f"{fix}")


def _left_pad(prompt_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> idx (B, P) left-padded with token 0, pad (B, 1) the padding per row."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (an empty prompt can start with <|endoftext|>)")
    P = max(len(p) for p in prompt_ids)
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompt_ids], dtype=torch.long, device=device)
    pad = torch.tensor([[P - len(p)] for p in prompt_ids], dtype=torch.long, device=device)
    return idx, pad


def _presence(prompt_ids: list[list[int]], vocab_limit: int, device: torch.device) -> torch.Tensor:
    """(B, vocab_limit) bool: which tokens each prompt holds (padding excluded)."""
    presence = torch.zeros(len(prompt_ids), vocab_limit, dtype=torch.bool, device=device)
    for i, p in enumerate(prompt_ids):
        ids = torch.tensor([t for t in p if t < vocab_limit], dtype=torch.long, device=device)
        presence[i, ids] = True
    return presence


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # a fresh nondeterministic seed
    else:
        g.manual_seed(seed)
    return g


def _noise(params: SamplingParams, shape: tuple[int, int], gen: torch.Generator, device: torch.device):
    """Exp(1) noise for one draw, or None when greedy (no random numbers used)."""
    if params.greedy:
        return None
    return torch.empty(shape, device=device).exponential_(generator=gen)


def _trim(rows: list[list[int]], eot_id: int | None) -> list[list[int]]:
    """Cut each row before its first EOT."""
    if eot_id is None:
        return rows
    return [r[:r.index(eot_id)] if eot_id in r else r for r in rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: Llama, prompt_ids: list[list[int]], cfg: SampleConfig, eot_id: int | None, vocab_limit: int,
             on_token: Callable[[list[int]], None] | None = None, stats: dict | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to cfg.max_new_tokens tokens; one row per prompt.

    Uses cfg's temperature, top_k, top_p, repetition_penalty, seed and compile (num_samples and prompt
    are the caller's business: repeat a prompt to sample it several times). Each returned row stops
    before its first `eot_id` (None: never stop early). `vocab_limit`: the tokenizer's vocabulary; ids
    at or above it (the model's padded rows) are never produced. `on_token(ids)` is called with one id
    per row after each step (EOT for rows already finished); `stats`, when given, receives
    prefill_s, decode_s, new_tokens (per row, including the first from the prefill) and batch.
    cfg.compile compiles the decode step (see _compiled_decode_step; the first call per shape compiles).
    """
    if cfg.num_beams > 1:
        raise ValueError("generate samples; for num_beams > 1 call beam_search (one prompt at a time)")
    device = model.lm_head_weight.device
    params = SamplingParams.of(cfg)
    B, P, n_new = len(prompt_ids), max((len(p) for p in prompt_ids), default=0), cfg.max_new_tokens
    check_fits(model, P, n_new)
    if vocab_limit > model.cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({vocab_limit}) is larger than the model's ({model.cfg.vocab_size})")
    eot = -1 if eot_id is None else eot_id
    idx, pad = _left_pad(prompt_ids, device)
    gen = _generator(device, cfg.seed)
    presence = _presence(prompt_ids, vocab_limit, device) if params.repetition_penalty != 1.0 else None
    step = _compiled_decode_step(device) if cfg.compile else _decode_step
    # Eager on the CPU: the lean step (cpu_decode.FastDecoder, a fraction of the model's per-token ops)
    fast = None if cfg.compile else fast_decoder(model)
    out = torch.full((B, n_new), eot, dtype=torch.long, device=device)  # (B, n_new) generated ids
    # On CPU the cache (and attention) stay fp32 whatever the weights: CPU SDPA in bf16 is several times slower
    # than fp32 (benchmarks/test_bench_sample.py) and the cache is small.
    cache_dtype = torch.float32 if device.type == "cpu" else model.lm_head_weight.dtype
    model.setup_caches(B, cache_slots(P + n_new, model.cfg.block_size), dtype=cache_dtype)
    try:
        t0 = time.perf_counter()
        logits = prefill(model, idx, pad, vocab_limit)
        tok = sample_one_no_sync(logits, params, presence, _noise(params, (B, vocab_limit), gen, device))
        done = tok == eot
        out[:, 0] = tok
        tok = tok.view(B, 1)  # (B, 1): the token each row feeds next
        _sync(device)
        t1 = time.perf_counter()
        cache_pos = torch.tensor([P], dtype=torch.long, device=device)  # (1,) the slot the next token goes to
        fast_pad = pad if fast is not None and bool((pad > 0).any()) else None  # None: no row is padded
        n = 1
        for i in range(1, n_new):
            if on_token is not None:
                on_token(out[:, i - 1].tolist())
                if bool(done.all()):
                    break
            elif i % CHECK_DONE_EVERY == 0 and bool(done.all()):
                break
            if presence is not None:
                presence.scatter_(1, tok, True)
            noise = _noise(params, (B, vocab_limit), gen, device)
            if fast is not None:
                logits = fast.step(tok, P + i - 1, fast_pad, vocab_limit)
                nxt = torch.where(done, eot, sample_one_no_sync(logits, params, presence, noise))
                done = done | (nxt == eot)
            else:
                nxt, done = step(model, tok, cache_pos, pad, presence, noise, done, params, eot, vocab_limit)
            # Copies: CUDA graphs reuse their output buffers on the next replay.
            out[:, i] = nxt
            tok, done = nxt.view(B, 1).clone(), done.clone()
            cache_pos += 1
            n += 1
        else:
            if on_token is not None:
                on_token(out[:, n_new - 1].tolist())
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.clear_caches()
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=n, batch=B, prompt_tokens=P)
    return _trim(out[:, :n].tolist(), eot_id)


@torch.inference_mode()
def generate_recompute(model: Llama, prompt_ids: list[list[int]], cfg: SampleConfig, eot_id: int | None,
                       vocab_limit: int, stats: dict | None = None) -> list[list[int]]:
    """The reference without a cache: every step runs the whole sequence through the model (prompts of
    equal length only). Draws the same random numbers as `generate`, so the two agree token for token."""
    device = model.lm_head_weight.device
    if len({len(p) for p in prompt_ids}) != 1:
        raise ValueError("generate_recompute needs prompts of equal length")
    params = SamplingParams.of(cfg)
    B, P, n_new = len(prompt_ids), len(prompt_ids[0]), cfg.max_new_tokens
    check_fits(model, P, n_new)
    eot = -1 if eot_id is None else eot_id
    gen = _generator(device, cfg.seed)
    presence = _presence(prompt_ids, vocab_limit, device) if params.repetition_penalty != 1.0 else None
    seq = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (B, P)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    t0 = time.perf_counter()
    t1 = t0
    for i in range(n_new):
        h = model.hidden_states(seq)  # (B, T, dim)
        nxt = sample_one_no_sync(lm_head_logits(model, h[:, -1], vocab_limit), params, presence,
                                 _noise(params, (B, vocab_limit), gen, device))
        nxt = torch.where(done, eot, nxt)
        done = done | (nxt == eot)
        if presence is not None:
            presence.scatter_(1, nxt[:, None], True)
        seq = torch.cat([seq, nxt[:, None]], dim=1)  # (B, T + 1)
        if i == 0:
            _sync(device)
            t1 = time.perf_counter()
        if bool(done.all()):
            break
    _sync(device)
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=time.perf_counter() - t1, new_tokens=seq.shape[1] - P, batch=B,
                     prompt_tokens=P)
    return _trim(seq[:, P:].tolist(), eot_id)


# -- beam search -----------------------------------------------------------------------------------------
@dataclass
class Hypothesis:
    """A finished beam: its tokens (EOT excluded), sum of log-probabilities (EOT's included) and its score."""

    tokens: list[int]
    logprob: float
    score: float
    stop: str  # "eot" or "length"


def _beam_score(logprob: float, length: int, length_penalty: float) -> float:
    """sum(log p) / length ** alpha, length counting every scored token (the EOT too): as in transformers."""
    return logprob / length ** length_penalty


class _Finished:
    """The best `n` finished hypotheses so far, best first."""

    def __init__(self, n: int, length_penalty: float):
        self.n, self.alpha, self.hyps = n, length_penalty, []

    def add(self, tokens: list[int], logprob: float, length: int, stop: str) -> None:
        self.hyps.append(Hypothesis(tokens, logprob, _beam_score(logprob, length, self.alpha), stop))
        self.hyps.sort(key=lambda h: -h.score)
        del self.hyps[self.n:]

    def cannot_improve(self, best_running: float, cur_len: int, max_len: int) -> bool:
        """True when no running beam can still beat the worst kept hypothesis (so beam search may stop).

        A running beam's sum of log-probabilities s only falls as it grows; with alpha > 0 its best reachable
        score is s / max_len ** alpha (the longest length), with alpha <= 0 it is s / cur_len ** alpha."""
        if len(self.hyps) < self.n:
            return False
        bound = best_running / (max_len if self.alpha > 0 else cur_len) ** self.alpha
        return self.hyps[-1].score >= bound


def _select_beams(scores: torch.Tensor, logprobs: torch.Tensor, n_beams: int, eot: int
                  ) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """One beam step on the host: scores (N,) running sums, logprobs (N, V) of the next token.

    Looks at the 2N best (beam, token) continuations: those ending in EOT become candidates for the finished
    list, the best N others the next beams. Returns (finished, running), each [(parent, token, new sum)].
    Continuations of -inf (padding beams, masked tokens) are dropped."""
    N, V = logprobs.shape
    total = (scores[:, None] + logprobs).view(-1)  # (N * V,)
    top, flat = torch.topk(total, min(2 * n_beams, N * V))  # (2N,) each
    finished, running = [], []
    for value, f in zip(top.tolist(), flat.tolist()):
        if value == float("-inf"):
            break
        parent, token = divmod(f, V)
        if token == eot:
            finished.append((parent, token, value))
        elif len(running) < n_beams:
            running.append((parent, token, value))
    return finished, running


def _beam_search_core(next_logprobs: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                      first_logprobs: torch.Tensor, cfg: SampleConfig, eot_id: int | None, vocab_limit: int,
                      device: torch.device, on_step: Callable[[list[int]], None] | None) -> list[Hypothesis]:
    """The search, independent of how log-probabilities are computed (cached or recomputed).

    first_logprobs (1, V): the prompt's next-token log-probabilities. next_logprobs(tokens (N, 1), parents
    (N,) or None) -> (N, V): the next log-probabilities of each beam after it takes its token, beam i
    continuing beam parents[i] (the caller reorders its state, e.g. the KV cache rows)."""
    N, n_new, alpha = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    eot = -1 if eot_id is None else eot_id
    done = _Finished(N, alpha)
    seqs: list[list[int]] = [[]]
    scores = torch.zeros(1, device=device)  # (R,) running sums; one beam before the first token
    logprobs = first_logprobs
    for length in range(1, n_new + 1):
        finished, running = _select_beams(scores, logprobs, N, eot)
        for parent, _, value in finished:
            done.add(seqs[parent], value, length, "eot")
        if not running:
            break
        seqs = [seqs[p] + [t] for p, t, _ in running]
        if length == n_new:  # out of room: the running beams end here
            for s, (_, _, value) in zip(seqs, running):
                done.add(s, value, length, "length")
            break
        if done.cannot_improve(running[0][2], length, n_new):
            break
        if on_step is not None:
            on_step(seqs[0])
        # Pad to N rows with copies of beam 0 at -inf, so the batch (and the cache) keeps N rows.
        rows = running + [(running[0][0], running[0][1], float("-inf"))] * (N - len(running))
        parents = torch.tensor([p for p, _, _ in rows], dtype=torch.long, device=device)  # (N,)
        tokens = torch.tensor([[t] for _, t, _ in rows], dtype=torch.long, device=device)  # (N, 1)
        scores = torch.tensor([v for _, _, v in rows], device=device)  # (N,)
        seqs = seqs + [seqs[0]] * (N - len(running))
        logprobs = next_logprobs(tokens, parents)
    return done.hyps


def _beam_logprobs(logits: torch.Tensor, presence: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Log-probabilities (fp32) of logits (B, V) after the repetition penalty (the scores beam search sums)."""
    if presence is not None:
        logits = apply_repetition_penalty(logits, presence, penalty)
    return torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def beam_search(model: Llama, prompt: list[int], cfg: SampleConfig, eot_id: int | None, vocab_limit: int,
                on_step: Callable[[list[int]], None] | None = None, stats: dict | None = None) -> list[Hypothesis]:
    """Beam search of cfg.num_beams beams on the KV cache; the finished hypotheses, best first.

    The prompt is prefilled once (batch 1) and its cache rows copied to the N beams; each step decodes one
    token per beam and reorders the cache rows (index_select) to follow the surviving beams, nothing is
    recomputed. A beam stops at EOT (`eot_id`; None: only at max_new_tokens). Scores are sums of
    log-probabilities (after the repetition penalty, when set) over length ** cfg.length_penalty; the search
    stops early once no running beam can beat the N-th finished one. Temperature, top-k, top-p and the seed
    do not apply. `on_step(tokens)` receives the best running beam after each step; `stats` as in generate.
    """
    device = model.lm_head_weight.device
    N, P, n_new = cfg.num_beams, len(prompt), cfg.max_new_tokens
    check_fits(model, P, n_new)
    if vocab_limit > model.cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({vocab_limit}) is larger than the model's ({model.cfg.vocab_size})")
    idx, pad = _left_pad([prompt], device)
    penalty = cfg.repetition_penalty
    presence = _presence([prompt], vocab_limit, device) if penalty != 1.0 else None
    cache_dtype = torch.float32 if device.type == "cpu" else model.lm_head_weight.dtype
    S = cache_slots(P + n_new, model.cfg.block_size)
    try:
        t0 = time.perf_counter()
        model.setup_caches(1, S, dtype=cache_dtype)
        first = _beam_logprobs(prefill(model, idx, pad, vocab_limit), presence, penalty)  # (1, V)
        if N > 1:  # (with one beam the batch-1 cache is the beams' cache: setup_caches would zero it)
            prompt_kv = [(layer.attention.cache.k, layer.attention.cache.v) for layer in model.layers]
            model.setup_caches(N, S, dtype=cache_dtype)
            for layer, (k, v) in zip(model.layers, prompt_kv):  # the one prefill shared by every beam
                layer.attention.cache.k.copy_(k.expand_as(layer.attention.cache.k))  # (1, ...) -> (N, ...)
                layer.attention.cache.v.copy_(v.expand_as(layer.attention.cache.v))
        if presence is not None:
            presence = presence.expand(N, -1).clone()  # (N, V)
        _sync(device)
        t1 = time.perf_counter()
        pad_n = torch.zeros(N, 1, dtype=torch.long, device=device)
        cache_pos = torch.tensor([P], dtype=torch.long, device=device)
        steps = [0]

        def next_logprobs(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
            nonlocal presence
            for layer in model.layers:  # each beam continues its parent's cache rows
                c = layer.attention.cache
                c.k.copy_(c.k.index_select(0, parents))
                c.v.copy_(c.v.index_select(0, parents))
            if presence is not None:
                presence = presence.index_select(0, parents).scatter_(1, tokens, True)
            logits = decode_one_token(model, tokens, cache_pos, pad_n, vocab_limit)  # (N, V)
            cache_pos.add_(1)
            steps[0] += 1
            return _beam_logprobs(logits, presence, penalty)

        hyps = _beam_search_core(next_logprobs, first, cfg, eot_id, vocab_limit, device, on_step)
        _sync(device)
        t2 = time.perf_counter()
    finally:
        model.clear_caches()
    if stats is not None:
        stats.update(prefill_s=t1 - t0, decode_s=t2 - t1, new_tokens=steps[0] + 1, batch=N, prompt_tokens=P)
    return hyps


@torch.inference_mode()
def beam_search_recompute(model: Llama, prompt: list[int], cfg: SampleConfig, eot_id: int | None,
                          vocab_limit: int) -> list[Hypothesis]:
    """The reference without a cache: every step runs each beam's whole sequence through the model."""
    device = model.lm_head_weight.device
    check_fits(model, len(prompt), cfg.max_new_tokens)
    penalty = cfg.repetition_penalty
    seq = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, P)
    presence = _presence([prompt], vocab_limit, device) if penalty != 1.0 else None

    def logprobs_of(seq: torch.Tensor, presence: torch.Tensor | None) -> torch.Tensor:
        logits = lm_head_logits(model, model.hidden_states(seq)[:, -1], vocab_limit)  # (B, V)
        return _beam_logprobs(logits, presence, penalty)

    def next_logprobs(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        nonlocal seq, presence
        seq = torch.cat([seq[parents], tokens], dim=1)  # (N, T + 1)
        if presence is not None:
            presence = presence.expand(len(parents), -1)[parents].scatter_(1, tokens, True)
        return logprobs_of(seq, presence)

    return _beam_search_core(next_logprobs, logprobs_of(seq, presence), cfg, eot_id, vocab_limit, device, None)


# -- streaming text --------------------------------------------------------------------------------------
class TextStream:
    """Token ids -> text, printing only complete UTF-8 characters (a character may span tokens)."""

    def __init__(self, token_bytes: Callable[[int], bytes], write: Callable[[str], object]):
        self.token_bytes, self.write = token_bytes, write
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> None:
        text = self.decoder.decode(self.token_bytes(token_id))
        if text:
            self.write(text)

    def close(self) -> None:
        text = self.decoder.decode(b"", final=True)
        if text:
            self.write(text)


# -- story requests --------------------------------------------------------------------------------------
def request_prompt(enc, words=None, features=None, summary: str = "", story_start: str = "") -> list[int]:
    """The prompt of a story request: the request rendered in the template the instruct stage trains on
    (storyllama.data_prep.instruct: "Words: ...\nFeatures: ...\nSummary: ...\nStory:\n", encoded alone, as
    bin/prepare_data --instruct encodes it), then the story's first words when given. Words and features: lists
    or comma-separated strings; features by name (dialogue, happy_ending, bad_ending, moral, twist, ...)."""
    from storyllama.data_prep.instruct import Request, request_ids

    req = Request.make(words, features, summary)
    if req.is_empty():
        raise ValueError("a story request needs --words, --features or --summary")
    return request_ids(enc, req) + (enc.encode_ordinary(story_start) if story_start else [])


# -- command line ----------------------------------------------------------------------------------------
def build_parser(prog: str = "sample") -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=prog, description="Sample stories from a StoryLlama checkpoint (KV-cached).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: samples from its latest checkpoint")
    src.add_argument("--checkpoint", help="a checkpoint directory (RUN_DIR/checkpoints/step_NNNNNN)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="ema: the averaged weights of a run trained with --ema_decay; raw: the trained ones; auto "
                   "(default): ema when the checkpoint has them")
    add_trust_flag(p)
    add_dataclass_args(p, SampleConfig, prefix_help="sampling")
    req = p.add_argument_group("story request (a model tuned on requests: bin/prepare_data --instruct; the prompt is "
                               "the request, and --prompt, if given, the story's first words)")
    req.add_argument("--words", default=None, help="words the story must use, comma-separated (e.g. kite,rain)")
    req.add_argument("--features", default=None, help="comma-separated: dialogue, happy_ending, bad_ending, moral, "
                     "twist, foreshadowing, conflict")
    req.add_argument("--summary", default=None, help="what the story is about, in a sentence")
    return p


def load_for_sampling(path: str, device: torch.device, dtype: torch.dtype, weights: str = "auto"):
    """(model in eval mode with weights in `dtype`, tiktoken encoding, checkpoint dir). The model's ops are
    the Triton kernels on CUDA and the reference ops elsewhere (storyllama.kernels.resolve_backend("auto"))."""
    from storyllama.checkpoint import load_model
    from storyllama.data_prep.tokenizer import load_encoding
    from storyllama.kernels.ops import resolve_backend

    model, ckpt = load_model(path, device=device, kernels=resolve_backend("auto", device), weights=weights)
    # Cast the weights only: the RoPE tables stay fp32 (model.to(dtype) would round them).
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return prepare_for_decoding(model), load_encoding(ckpt), ckpt


def main(argv: list[str] | None = None, prog: str = "sample") -> int:
    from storyllama.checkpoint import EMA_WEIGHTS, CheckpointError, trust_unverified, weights_file
    from storyllama.data_prep.tokenizer import TokenizerError

    ns = build_parser(prog).parse_args(argv)
    trust_unverified(ns.trust_unverified)
    try:
        cfg = SampleConfig(**given(ns, SampleConfig))
        dtype = resolve_dtype(cfg.dtype)
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights: TF32 tensor cores for the matmuls
            torch.backends.cudnn.allow_tf32 = True
        model, enc, ckpt = load_for_sampling(ns.run or ns.checkpoint, device, dtype, ns.weights)
        if weights_file(ckpt, ns.weights) == EMA_WEIGHTS:
            print(f"[{ckpt}] sampling from the EMA weights ({EMA_WEIGHTS}; --weights raw for the trained ones)",
                  file=sys.stderr)
        eot_id = enc.eot_token
        if ns.words is not None or ns.features is not None or ns.summary is not None:
            # The prompt is the request; --prompt, when given, is the story's first words (printed with the story).
            cfg.prompt = cfg.prompt if ns.prompt is not None else [""]
            prompts = [request_prompt(enc, ns.words, ns.features, ns.summary or "", text) for text in cfg.prompt]
            print(enc.decode(request_prompt(enc, ns.words, ns.features, ns.summary or "")), end="", file=sys.stderr)
        else:
            # An empty prompt starts a story from scratch: training data separates stories with EOT.
            prompts = [enc.encode(text, allowed_special="all") or [eot_id] for text in cfg.prompt]
        check_fits(model, max(len(p) for p in prompts), cfg.max_new_tokens)
    except (ValueError, OSError, CheckpointError, TokenizerError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    stats: dict = {}
    try:
        _write_stories(model, enc, prompts, cfg, stats)
    except BrokenPipeError:
        # The reader went away (`bin/sample ... | head -1`): stop quietly. Point stdout at devnull so the
        # interpreter's final flush does not raise again (the Python docs' recipe for SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    n = stats["new_tokens"] * stats["batch"]
    print(f"[{ckpt}] prefill {stats['prompt_tokens']} x {stats['batch']} tokens in {stats['prefill_s']:.3f} s; "
          f"decode {n} tokens in {stats['decode_s']:.2f} s ({n / max(stats['decode_s'], 1e-9):.1f} tokens/s"
          + (", including compiling the decode step)" if cfg.compile else ")"), file=sys.stderr)
    return 0


def _write_stories(model: Llama, enc, prompts: list[list[int]], cfg: SampleConfig, stats: dict) -> None:
    """Generate and print: one story streams as it is written; several print one after another."""
    eot_id = enc.eot_token
    if cfg.num_beams > 1:
        # Beam search: one prompt at a time, the num_samples best beams of each, best first.
        for prompt_no, prompt in enumerate(prompts):
            hyps = beam_search(model, prompt, cfg, eot_id, enc.n_vocab, stats=stats)
            for rank, h in enumerate(hyps[:cfg.num_samples]):
                print(f"--- prompt {prompt_no + 1}, beam {rank + 1}: score {h.score:.3f}, log p {h.logprob:.2f}, "
                      f"stop: {h.stop} ---")
                print(cfg.prompt[prompt_no] + enc.decode(h.tokens))
        sys.stdout.flush()
        return
    rows = [p for p in prompts for _ in range(cfg.num_samples)]
    if len(rows) == 1:
        # One story: stream it as it is written.
        sys.stdout.write(cfg.prompt[0])
        sys.stdout.flush()
        stream = TextStream(enc.decode_single_token_bytes, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        finished = [False]

        def on_token(ids: list[int]) -> None:
            if not finished[0]:
                if ids[0] == eot_id:
                    finished[0] = True
                else:
                    stream.feed(ids[0])

        generate(model, rows, cfg, eot_id, enc.n_vocab, on_token=on_token, stats=stats)
        stream.close()
        sys.stdout.write("\n")
    else:
        outs = generate(model, rows, cfg, eot_id, enc.n_vocab, stats=stats)
        for i, ids in enumerate(outs):
            prompt_no, sample_no = divmod(i, cfg.num_samples)
            print(f"--- prompt {prompt_no + 1}, sample {sample_no + 1} ---")
            print(cfg.prompt[prompt_no] + enc.decode(ids))
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
