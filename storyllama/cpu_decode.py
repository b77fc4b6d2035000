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
