"""The Llama: token embedding, N pre-norm blocks (RMSNorm -> GQA attention with RoPE -> residual;
RMSNorm -> SwiGLU MLP -> residual), a final RMSNorm and a tied or untied LM head.

The elementwise ops (RMSNorm, RoPE, SwiGLU, linear + cross-entropy) come from `storyllama.kernels.get_ops`,
chosen once at construction: Triton kernels on CUDA, the plain PyTorch references elsewhere.

Two ways to run it:
- training / scoring: `model(idx, targets)` -> mean loss; `model(idx)` -> logits (B, T, V);
- document masking: `model(idx, targets, doc_eot=EOT)` keeps attention inside each story of a packed window
  (see `doc_mask`) and ignores the target after each EOT (the next story's first token, which only the
  previous story could predict);
- generation: `model.setup_caches(batch, max_len)` then `model(idx, positions=..., cache_pos=...,
  attn_mask=...)` writes k and v into the preallocated cache slots `cache_pos` and attends to the
  cache under `attn_mask`. `storyllama.sample` builds those tensors.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from storyllama.config import ModelConfig
from storyllama.kernels.ops import KernelOps, get_ops
from storyllama.kernels.rope import rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: KernelOps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rmsnorm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (batch, kv_heads, max_len, head_dim) each."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) into slots cache_pos (T,); return the whole cache (B, Hkv, S, D)."""
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


def doc_mask(idx: torch.Tensor, eot: int) -> torch.Tensor:
    """(B, 1, T, T) bool attention mask of token ids idx (B, T), True = attend: causal, and inside one story.

    A token's segment is the number of EOTs strictly before it (an EOT belongs to the story it ends); token i
    attends to j <= i of the same segment. Built on idx's device, no host sync. RoPE scores depend only on
    relative positions, so a story that starts in the middle of a window is scored as at position 0."""
    T = idx.shape[1]
    is_eot = idx == eot  # (B, T)
    seg = is_eot.cumsum(1) - is_eot.long()  # (B, T) EOTs strictly before each position
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


def _cuda_rules(q: torch.Tensor) -> bool:
    """Whether CUDA's SDPA kernel constraints apply to q (a function, so tests can apply them on CPU)."""
    return q.is_cuda


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with grouped-query heads, called so that a fused SDPA kernel serves it.

    q (B, H, T, D); k, v (B, Hkv, S, D), each kv head shared by H / Hkv consecutive query heads.
    attn_mask (B or 1, 1, T, S) bool, True = attend; None = causal (training, T == S). -> (B, H, T, D).
    Masks come from the sampler (prefill and decode against the KV cache) and from document masking in
    training (`doc_mask`, T == S); both take the mask paths below.

    Which kernel takes `F.scaled_dot_product_attention` on CUDA (torch's sdp_utils checks): flash accepts
    enable_gqa but neither a mask nor fp32; memory-efficient accepts a mask and fp32 but not enable_gqa;
    anything else falls to the math kernel, which materialises the (T, S) scores. So on CUDA:
    - no mask, half precision: enable_gqa (flash);
    - no mask, fp32: k and v expanded to H heads (repeat_interleave) for the memory-efficient kernel;
    - a mask (prefill and decode against the KV cache; document-masked training): the H / Hkv query heads of
      each group are folded into the query-length axis, q (B, Hkv, rep * T, D) against the cache's own k, v
      (B, Hkv, S, D), the mask repeated per head: the same dot products, no copy of the cache, no enable_gqa
      (memory-efficient; in training it takes the place of flash, and its mask costs B x rep x T x T per call).
    On CPU the flash kernel takes enable_gqa with or without a mask, in fp32 and bf16 (not with dropout:
    nothing fused does there), and is faster so than folded (one decode token, 88m shapes, 1 thread:
    52 us vs 125 us per call): enable_gqa throughout.
    """
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    causal = attn_mask is None
    if rep == 1 or not _cuda_rules(q) or (causal and q.dtype != torch.float32):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, dropout_p=dropout,
                                              enable_gqa=rep > 1)
    if causal:  # fp32 on CUDA
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    Hkv, S = k.shape[1], k.shape[2]
    qf = q.reshape(B, Hkv, rep * T, D)  # (B, Hkv, rep * T, D): head g * rep + r, query t -> group g, row r * T + t
    mask = attn_mask.expand(attn_mask.shape[0], 1, T, S).repeat(1, 1, rep, 1)  # (B or 1, 1, rep * T, S)
    y = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, dropout_p=dropout)  # (B, Hkv, rep * T, D)
    return y.reshape(B, H, T, D)  # a view when y is contiguous


def drop(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout that reads the rate only in training: a graph compiled in eval mode (the evaluations) then does not
    guard on it, and does not recompile when bin/train --dropout_start switches the rate."""
    return F.dropout(x, p, True) if training and p > 0 else x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout, self.attn_dropout = cfg.dropout, cfg.attn_dropout
        self.ops = ops
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q, k = self.ops.rope(q, cos, sin), self.ops.rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, D)
        if self.cache is None:
            # attn_mask: None (causal) or a document mask
            y = attend(q, k, v, attn_mask, self.attn_dropout if self.training else 0.0)
        else:
            k, v = self.cache.update(cache_pos, k, v)  # (B, Hkv, S, D)
            # The cache may be wider than the weights (fp32 beside bf16 weights on CPU, where bf16 SDPA is
            # much slower: benchmarks/test_bench_sample.py); attention runs in the cache's dtype. A no-op when
            # the dtypes agree.
            y = attend(q.to(k.dtype), k, v, attn_mask, 0.0).to(q.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * D)
        return drop(self.wo(y), self.dropout, self.training)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.dropout = cfg.dropout
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop(self.w2(self.ops.swiglu(self.w1(x), self.w3(x))), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.attention = Attention(cfg, ops)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.feed_forward = FeedForward(cfg, ops)

    def forward(self, x, cos, sin, cache_pos=None, attn_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache_pos, attn_mask)
        return x + self.feed_forward(self.ffn_norm(x))


def machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def check_fits_in_memory(cfg: ModelConfig) -> None:
    """A shape whose float32 weights alone exceed this machine's memory is refused by name before anything is
    allocated (the model is always built in float32 on the CPU first); the meta device allocates nothing."""
    if torch.empty(0).device.type == "meta":
        return
    need, have = 4 * cfg.num_params(), machine_memory_bytes()
    if have is not None and need > have:
        raise ValueError(f"a model of this shape has {cfg.num_params():,} parameters, {need / 2**30:,.1f} GiB in "
                         f"float32, more than this machine's {have / 2**30:,.1f} GiB of memory: choose a smaller "
                         "--dim, --n_layers, --hidden_dim or --vocab_size")


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: str = "reference", fused_ce: bool = True):
        """kernels: "triton" or "reference" (see storyllama.kernels.resolve_backend for "auto").
        fused_ce: compute the training loss with the chunked linear + cross-entropy (no full logits)."""
        check_fits_in_memory(cfg)
        super().__init__()
        self.cfg = cfg
        self.ops = get_ops(kernels)
        self.fused_ce = fused_ce
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = cfg.dropout  # the embeddings' (residual) rate
        self.layers = nn.ModuleList(Block(cfg, self.ops) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.ops)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # cos/sin for positions 0..block_size-1, fp32, (1, T, D/2); not saved with the weights.
        cos, sin = rope_cos_sin(torch.arange(cfg.block_size)[None], cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._kv_caches: dict[tuple, list[KVCache]] = {}  # (batch, max_len, dtype, device) -> one cache per layer
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 / llama2.c init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    @torch.no_grad()
    def zero_output_projections(self) -> None:
        """Start every block's attention wo and MLP w2 at zero (bin/train --zero_init): each block is then the
        identity at step 0, and the first step's gradients still reach wo and w2 (their inputs are non-zero)."""
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                p.zero_()

    def set_dropout(self, on: bool) -> None:
        """Training dropout at the config's rates (on) or none (off: bin/train --dropout_start, before that step).
        The rates are plain attributes read in training forwards only: with --compile the switch compiles one
        more training graph and no evaluation graph (tests/test_resume.py counts them)."""
        resid, attn = (self.cfg.dropout, self.cfg.attn_dropout) if on else (0.0, 0.0)
        self.dropout = resid
        for block in self.layers:
            block.attention.dropout, block.attention.attn_dropout = resid, attn
            block.feed_forward.dropout = resid

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    # -- forward -------------------------------------------------------------------------------------
    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      cache_pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                      doc_eot: int | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) of token ids idx (B, T).
        doc_eot: attend only inside each story, stories ending at this token id (`doc_mask`)."""
        B, T = idx.shape
        if doc_eot is not None:
            if attn_mask is not None or cache_pos is not None:
                raise ValueError("doc_eot builds its own attention mask: it does not combine with attn_mask or a "
                                 "KV cache")
            attn_mask = doc_mask(idx, doc_eot)  # (B, 1, T, T), shared by every layer
        if positions is None:
            if T > self.cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                                 f"(block_size {self.cfg.block_size})")
            cos, sin = self.rope_cos[:, :T], self.rope_sin[:, :T]  # (1, T, D/2)
        else:
            # Per-row positions (B or 1, T), e.g. left-padded prompts while sampling.
            cos, sin = self.rope_cos[0][positions], self.rope_sin[0][positions]  # (B, T, D/2)
        x = drop(self.tok_embeddings(idx), self.dropout, self.training)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, cos, sin, cache_pos, attn_mask)
        return self.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, doc_eot: int | None = None,
                reduction: str = "mean", **kw) -> torch.Tensor:
        """With targets (B, T): the cross-entropy over targets != -100, its mean or ("sum") its sum. Without:
        logits (B, T, V).

        doc_eot: document masking (`doc_mask`), and the target at every position whose input is doc_eot is
        ignored: it is the next story's first token, which the story that just ended cannot predict."""
        h = self.hidden_states(idx, doc_eot=doc_eot, **kw)
        if targets is None:
            return F.linear(h, self.lm_head_weight)
        if doc_eot is not None:
            targets = targets.masked_fill(idx == doc_eot, -100)  # (B, T)
        return self.loss(h, targets, reduction)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The one loss path: fused chunked linear + cross-entropy, or full logits then cross-entropy."""
        h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)  # (B*T, dim), (B*T,)
        if self.fused_ce:
            return self.ops.linear_cross_entropy(h2, self.lm_head_weight, t, -100, reduction)
        logits = F.linear(h2, self.lm_head_weight).float()  # (B*T, V), fp32 for the softmax
        return F.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)

    # -- generation ------------------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Attach a KV cache of max_len slots per layer (max_len <= block_size: RoPE is built for that).

        The caches are kept after clear_caches: the next call with the same (batch, max_len, dtype, device)
        gets the same storage back, zeroed, so a compiled decode step (a CUDA graph recorded on the cache's
        addresses) is replayed rather than recorded again. free_caches drops them.
        """
        if max_len > self.cfg.block_size:
            raise ValueError(f"cache of {max_len} tokens exceeds the model's context ({self.cfg.block_size}); "
                             "shorten the prompt or --max_new_tokens")
        p = self.tok_embeddings.weight
        key = (batch, max_len, dtype or p.dtype, p.device)
        caches = self._kv_caches.get(key)
        if caches is None:
            caches = [KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, key[2], p.device)
                      for _ in self.layers]
            self._kv_caches[key] = caches
        else:
            # Masks never read a slot before it is written; zeroing keeps a NaN of an earlier run out of
            # the masked scores (NaN + -inf is NaN) at the cost of one memset, in place.
            for c in caches:
                c.k.zero_()
                c.v.zero_()
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache

    def clear_caches(self) -> None:
        """Detach the caches (the model computes without them again); their storage is kept for reuse."""
        for layer in self.layers:
            layer.attention.cache = None

    def free_caches(self) -> None:
        self.clear_caches()
        self._kv_caches.clear()

    # -- optimizer -----------------------------------------------------------------------------------
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on matrices (linears, embedding) only; none on norms."""
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
