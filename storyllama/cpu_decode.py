"""Decoding on CPU with the weights prepacked for oneDNN: `prepare_for_decoding(model)` (bin/sample applies it).

Decoding multiplies a few rows (the batch) by every weight matrix, so it runs at the speed the matmul
streams weights. On the project's reference CPU (AMD Zen 5, 1 thread) PyTorch's default fp32 path (MKL)
streams a 512 x 50,304 head at ~17 GB/s for 1 row and ~10 GB/s for 8 rows; oneDNN with the weight
reordered once into its blocked layout streams it at ~47 and ~28 GB/s (bf16: ~18 -> ~48 and ~15 -> ~28 GB/s).

How: each large bias-free nn.Linear inside the blocks is replaced by a `PackedLinear`, an explicit wrapper
that keeps the original Linear (and shares its weight Parameter, so parameters and state dict are
unchanged) and, without gradients, multiplies through a oneDNN-packed copy of the weight. The LM head (the
model calls F.linear on `lm_head_weight`) goes through `lm_head_logits`. The packed copies live in a
registry keyed by an integer, made on first use, redone when the weight changes (data pointer or version),
and dropped with their module. Under torch.compile the packed matmul is the opaque custom op
`storyllama::decode_linear` (dynamo cannot trace oneDNN's packed tensors); the weight is its input, so a
compiled graph reads the live parameter.
"""

from __future__ import annotations

import itertools
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

_PACK_ROWS_HINT = 64  # the row count oneDNN blocks for; measured as fast for 1-16 rows as a hint of 1 or 8
PACK_MIN_BYTES = 512 << 10  # smaller matrices sit in cache, where the packed path's per-call cost outweighs its gain
# A model whose weights fit in the last-level cache (32 MB on the reference CPU) reads them from cache at 1
# row per step as fast through PyTorch's gemv: the packed path then pays off only for several rows (measured:
# small shape, batch 1: 1,750-1,800 tok/s plain vs 1,340 packed; batch 8: 3,500 plain vs 4,550 packed).
PACK_ONE_ROW_MIN_MODEL_BYTES = 32 << 20
_packed: dict[int, tuple[tuple, torch.Tensor]] = {}  # key -> (weight signature, packed weight)
_pack_keys = itertools.count()
_dtype_supported: dict[torch.dtype, bool] = {}


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of `dtype` on this CPU (its bf16 path needs AVX512-BF16-era ISAs:
    avx_ne_convert, or avx512bw + avx512vl + avx512dq; without them the reorder raises)."""
    if dtype not in _dtype_supported:
        ok = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
        if ok:
            try:
                torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), _PACK_ROWS_HINT)
            except RuntimeError:
                ok = False
        _dtype_supported[dtype] = ok
    return _dtype_supported[dtype]


def _packed_weight(weight: torch.Tensor, key: int) -> torch.Tensor:
    """The oneDNN-packed copy of weight (out, in), repacked if the weight changed since (data or version)."""
    sig = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    hit = _packed.get(key)
    if hit is None or hit[0] != sig:
        hit = (sig, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS_HINT))
        _packed[key] = hit
    return hit[1]


def _decode_linear_eager(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != weight.dtype or not packing_supported(x.dtype):
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight, key), None, "none", [], "")


@torch.library.custom_op("storyllama::decode_linear", mutates_args=())
def _decode_linear_op(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    """x @ weight.T through the packed copy of weight: an opaque op to torch.compile, which cannot trace
    oneDNN's packed tensors; weight is an input so the graph reads the live parameter."""
    return _decode_linear_eager(x, weight, key)


@_decode_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
    """x (..., in) @ weight (out, in).T with the packed weight registered under key; no gradient."""
    if torch.compiler.is_compiling():
        return _decode_linear_op(x, weight, key)
    return _decode_linear_eager(x, weight, key)


def _register_pack(owner: object) -> int:
    key = next(_pack_keys)
    weakref.finalize(owner, _packed.pop, key, None)  # the packed copy goes with its module or model
    return key


class PackedLinear(nn.Module):
    """A bias-free nn.Linear for decoding: without gradients x @ W.T runs through W's oneDNN-packed copy.

    Holds the Linear it replaces (`self.linear`, for `unwrap`) and registers that Linear's weight
    Parameter itself, so the parameters, their names and the state dict stay those of the Linear. With
    gradients enabled (training, scoring with grad) it computes exactly F.linear.
    """

    def __init__(self, linear: nn.Linear, one_row: bool):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear wraps bias-free Linears only")
        self.__dict__["linear"] = linear  # kept, not registered: its weight is registered below under its own name
        self.weight = linear.weight  # the same Parameter object: optimizer and state dict see no change
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.one_row = one_row  # also take the packed path for a single row (weights streamed from memory)
        self.pack_key = _register_pack(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or (x.numel() == x.shape[-1] and not self.one_row):
            return F.linear(x, self.weight)
        return decode_linear(x, self.weight, self.pack_key)

    def unwrap(self) -> nn.Linear:
        return self.linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, one_row={self.one_row}"


def lm_head_logits(model: nn.Module, h: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """Logits (B, vocab_limit) in fp32 of hidden states h (B, dim), through the packed head when
    prepare_for_decoding packed it. Rows of the head past the tokenizer's vocabulary (padding to a
    multiple of 64) are cut off (never sampled)."""
    head = getattr(model, "_packed_head", None)  # (key, one_row), set by prepare_for_decoding
    if head is None or torch.is_grad_enabled() or (h.shape[0] == 1 and not head[1]):
        return F.linear(h, model.lm_head_weight[:vocab_limit]).float()  # (B, vocab_limit)
    return decode_linear(h, model.lm_head_weight, head[0]).float()[:, :vocab_limit]  # (B, V) -> (B, vocab_limit)


def prepare_for_decoding(model: nn.Module, min_bytes: int = PACK_MIN_BYTES) -> nn.Module:
    """Route the model's matmuls through oneDNN-packed copies of the weights when decoding on CPU, in place.

    The large bias-free Linears of model.layers become PackedLinear wrappers; the LM head is packed too.
    Parameters and state dict are unchanged; the packed copies (one more copy of the weights in memory)
    are made on first use and redone if a weight changes; with gradients enabled the model computes
    exactly as before. No-op on CUDA, or where oneDNN cannot pack the weights' dtype on this CPU.
    """
    w = model.lm_head_weight
    if w.device.type != "cpu" or not packing_supported(w.dtype):
        return model
    one_row = sum(p.nbytes for p in model.parameters()) >= PACK_ONE_ROW_MIN_MODEL_BYTES
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None and child.weight.nbytes >= min_bytes:
                setattr(parent, name, PackedLinear(child, one_row))
    if getattr(model, "_packed_head", None) is None and w.nbytes >= min_bytes:
        model._packed_head = (_register_pack(model), one_row)
    return model


# -- the lean decoding step -------------------------------------------------------------------------------
class FastDecoder:
    """One decoding step on the CPU in as few ATen calls as the math allows: the model's own forward runs
    about 75 ops per layer for one token (the reference RMSNorm, RoPE and SwiGLU are several ops each, and
    every one costs a dispatch); here a layer is 17: RMSNorm, one q/k/v matmul (the three weights
    concatenated once), RoPE on q and k together as x * cos + roll(x) * sin (3 ops, tables per position),
    the two cache writes, SDPA over the written slots, wo with the residual add fused, RMSNorm, w1 with SiLU
    fused, w3, the product, w2 with the residual add fused. The same arithmetic as `decode_one_token`
    (tests/test_sample.py compares logits and generated tokens); it writes the model's own KV cache, so a
    prefill through the model and these steps share it.

    Matmuls take oneDNN's packed weights (the fused post-ops come with them) where `prepare_for_decoding`
    would pack, else PyTorch's plain ones (addmm for the residual). The concatenated q/k/v weights are a
    copy (wq + wk + wv bytes); `refresh()` (called by `generate` before each use) rebuilds them when a
    weight changed, so a model trained further decodes correctly.
    """

    def __init__(self, model: nn.Module):
        self.model = weakref.ref(model)
        self._sig = None
        self.refresh()

    def _signature(self, model) -> tuple:
        return tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters())

    def refresh(self) -> None:
        model = self.model()
        sig = self._signature(model)
        if sig == self._sig:
            return
        cfg = model.cfg
        self.H, self.Hkv, self.D, self.eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        # Half-precision weights of a model small enough to sit in the caches decode in float32 (copies made here,
        # exact upcasts): there the time is per-op cost, and half-precision matmuls and the casts around them cost
        # more per call (measured at the 1M shape: bf16 decoding at 0.4x of fp32 on this project's CPU). A larger
        # model keeps its dtype: reading half the bytes is the point of it.
        wdtype = model.lm_head_weight.dtype
        fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
        self.dtype = torch.float32 if wdtype != torch.float32 and fp32_bytes <= PACK_ONE_ROW_MIN_MODEL_BYTES else wdtype

        def own(t: torch.Tensor) -> torch.Tensor:  # a weight as the decoder computes with it
            return t if t.dtype == self.dtype else t.detach().to(self.dtype)

        def weight(linear: nn.Module) -> _Weight:
            return _Weight.of(linear) if linear.weight.dtype == self.dtype else _Weight(own(linear.weight))

        self.packing = packing_supported(self.dtype)
        self.layers = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            qkv = own(torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).detach())  # ((H + 2 Hkv) D, dim): a copy
            self.layers.append(dict(
                attn_norm=own(layer.attention_norm.weight), ffn_norm=own(layer.ffn_norm.weight), qkv=_Weight(qkv),
                wo=weight(a.wo), w1=weight(f.w1), w3=weight(f.w3), w2=weight(f.w2), attention=a))
        self.norm = own(model.norm.weight)
        self.emb = own(model.tok_embeddings.weight)
        head = getattr(model, "_packed_head", None)  # share the head's packed copy with lm_head_logits
        self.head = (_Weight(model.lm_head_weight, head[0] if head is not None else None)
                     if model.lm_head_weight.dtype == self.dtype else _Weight(own(model.lm_head_weight)))
        # RoPE per position, over the whole head dim: cos | cos and -sin | sin (half-split layout)
        cos, sin = model.rope_cos[0], model.rope_sin[0]  # (block_size, D/2) fp32
        self.cos = torch.cat([cos, cos], dim=-1).contiguous()  # (block_size, D)
        self.sin = torch.cat([-sin, sin], dim=-1).contiguous()
        # Several rows: the packed weights (measured faster on both CPUs we have). One row: whichever this CPU's
        # GEMV streams faster, timed once on the largest matrix of a block (the MLP's): oneDNN's packed layout
        # won by 2.8x on an AMD Zen 5, PyTorch's plain one by 1.2x (fp32) on an Intel Sapphire Rapids.
        self.pack_one_row = self.packing and self.layers[0]["w1"].packed_is_faster(rows=1)
        self._sig = sig

    def _packed(self, rows: int) -> bool:
        return self.packing and (rows > 1 or self.pack_one_row)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        # bf16: normalised in fp32, cast back before the weight (the reference RMSNorm's rounding)
        return F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype) * w

    @torch.inference_mode()
    def step(self, tok: torch.Tensor, pos: int, pad: torch.Tensor | None, vocab_limit: int) -> torch.Tensor:
        """Logits (B, vocab_limit) fp32 of one token per row tok (B, 1) written into cache slot `pos`; pad
        (B, 1) padding slots at the start of each row, or None when no row is padded."""
        B = tok.shape[0]
        H, Hkv, D = self.H, self.Hkv, self.D
        packed = self._packed(B)
        x = F.embedding(tok.view(B), self.emb)  # (B, dim)
        if pad is None:
            cos, sin, mask = self.cos[pos], self.sin[pos], None  # (D,): one position for every row
        else:
            positions = (pos - pad).view(B)  # (B,)
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, D)
            mask = (torch.arange(pos + 1) >= pad).view(B, 1, 1, pos + 1)  # (B, 1, 1, pos + 1): real slots
        for L in self.layers:
            cache = L["attention"].cache
            qkv = L["qkv"].mm(self._norm(x, L["attn_norm"]), packed).view(B, H + 2 * Hkv, D)
            qk = qkv[:, : H + Hkv]
            qk = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin)  # RoPE, fp32 (the tables' dtype)
            if qk.dtype != x.dtype:
                qk = qk.to(x.dtype)  # the reference RoPE returns its input's dtype
            cache.k.select(2, pos).copy_(qk[:, H:])
            cache.v.select(2, pos).copy_(qkv[:, H + Hkv:])
            q = qk[:, :H].unsqueeze(2)  # (B, H, 1, D)
            if q.dtype != cache.k.dtype:
                q = q.to(cache.k.dtype)  # the cache (and attention) may be wider than the weights
            y = F.scaled_dot_product_attention(q, cache.k[:, :, : pos + 1], cache.v[:, :, : pos + 1],
                                               attn_mask=mask, enable_gqa=H != Hkv).view(B, H * D)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            x = L["wo"].mm(y, packed, residual=x)
            h = self._norm(x, L["ffn_norm"])
            gate = L["w1"].mm(h, packed, silu=True)
            x = L["w2"].mm(gate * L["w3"].mm(h, packed), packed, residual=x)
        logits = self.head.mm(self._norm(x, self.norm), packed, rows=vocab_limit)
        return logits if logits.dtype == torch.float32 else logits.float()


class _Weight:
    """A (out, in) weight for FastDecoder: PyTorch's plain matmul, or oneDNN's packed copy with its fused post-op
    (SiLU, or the residual add). `key`: the copy in the registry that PackedLinear and the packed head use (one
    packed copy per weight, shared with the prefill); without it the weight packs its own, on first use."""

    def __init__(self, w: torch.Tensor, key: int | None = None):
        self.w, self.key = w, key
        self.wt = w.t()  # (in, out): addmm's operand, made once
        self._packed: torch.Tensor | None = None

    @classmethod
    def of(cls, linear: nn.Module) -> _Weight:
        return cls(linear.weight, linear.pack_key if isinstance(linear, PackedLinear) else None)

    def packed_is_faster(self, rows: int, reps: int = 8) -> bool:
        """Whether x @ W.T for `rows` rows runs clearly faster (by 10%) through the packed copy than through
        PyTorch's matmul (the best of `reps` calls each, after a warm-up). The margin keeps the choice, and so the
        rounding of the logits, the same from run to run where the two are close."""
        x = torch.randn(rows, self.w.shape[1], dtype=self.w.dtype)
        best = {}
        for packed in (False, True, False, True):  # interleaved, twice: the later pass is the warm one
            t = []
            for _ in range(reps):
                t0 = time.perf_counter()
                self.mm(x, packed)
                t.append(time.perf_counter() - t0)
            best[packed] = min(t)
        return best[True] < 0.9 * best[False]

    def packed(self) -> torch.Tensor:
        if self._packed is None:  # FastDecoder.refresh makes new _Weights when a weight changes
            self._packed = (_packed_weight(self.w, self.key) if self.key is not None
                            else torch.ops.mkldnn._reorder_linear_weight(self.w.detach(), _PACK_ROWS_HINT))
        return self._packed

    def mm(self, x: torch.Tensor, packed: bool, residual: torch.Tensor | None = None, silu: bool = False,
           rows: int | None = None) -> torch.Tensor:
        if packed:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed(), None, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed(), None, "swish" if silu else "none", [], "")
            return y if rows is None else y[:, :rows]
        if residual is not None:
            return torch.addmm(residual, x, self.wt)
        y = F.linear(x, self.w if rows is None else self.w[:rows])
        return F.silu(y) if silu else y


USE_FAST_DECODER = True  # benchmarks/test_bench_llama_cpp.py turns it off to time the model's own forward


def fast_decoder(model: nn.Module) -> FastDecoder | None:
    """The model's FastDecoder (made once, refreshed when a weight changed), or None off the CPU."""
    if not USE_FAST_DECODER or model.lm_head_weight.device.type != "cpu" or model.training:
        return None
    dec = getattr(model, "_fast_decoder", None)
    if dec is None:
        dec = FastDecoder(model)
        model._fast_decoder = dec
    else:
        dec.refresh()
    return dec
