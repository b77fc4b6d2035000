"""The mapping between our Llama and Hugging Face transformers' `LlamaForCausalLM`.

Our RoPE uses the half-split layout that transformers uses, so q and k weights copy across unpermuted.
"""

from __future__ import annotations

import torch

from storyllama.config import ModelConfig

# our name -> transformers' name, per layer ("{i}" is the layer index)
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_config_dict(cfg: ModelConfig) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same model."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", torch_dtype="float32", architectures=["LlamaForCausalLM"], model_type="llama",
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (unwrapped names) -> transformers' names."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_KEYS.items():
            out[f"model.layers.{i}.{theirs}"] = state[f"layers.{i}.{ours}"]
    out["lm_head.weight"] = state["tok_embeddings.weight"] if cfg.tie_embeddings else state["output.weight"]
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' names -> ours (the inverse of `to_hf_state_dict`); with tied embeddings lm_head is dropped."""
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_KEYS.items():
            out[f"layers.{i}.{ours}"] = hf_state[f"model.layers.{i}.{theirs}"]
    if not cfg.tie_embeddings:
        out["output.weight"] = hf_state["lm_head.weight"]
    return out


def hf_weight_names(cfg: ModelConfig) -> list[str]:
    """Every transformers name a LlamaForCausalLM of this shape has (lm_head only when untied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    names += [f"model.layers.{i}.{theirs}" for i in range(cfg.n_layers) for theirs in _LAYER_KEYS.values()]
    return names + ([] if cfg.tie_embeddings else ["lm_head.weight"])
