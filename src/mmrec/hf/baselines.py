"""The Transformer baselines as transformers' own classes: weights mapped, nothing of mmrec needed to load them.

=========  ======================  ==================================================================
preset     transformers class      mapping
=========  ======================  ==================================================================
llama      ``LlamaForCausalLM``    q/k rows permuted per head: mmrec rotates interleaved pairs (2i, 2i+1),
                                   transformers rotates halves (i, i + dh/2) with the same frequencies
mistral    ``MistralForCausalLM``  as llama, ``sliding_window`` = window (both: key j seen by query i iff
                                   i - window < j <= i)
gpt        ``GPT2LMHeadModel``     weights transposed into GPT-2's Conv1D layout; tanh GELU = gelu_new
=========  ======================  ==================================================================

All three tie the head to the embedding, as mmrec does; SwiGLU's fused ``w13`` splits into gate and up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmrec.config import TransformerConfig
from mmrec.models.transformer import TransformerLM

HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt": "GPT2LMHeadModel"}


def rope_halves_order(head_dim: int) -> Tensor:
    """Rows of one head in transformers' order: mmrec's even dims (first of each pair), then the odd ones."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _rope_rows(weight: Tensor, n_heads: int) -> Tensor:
    """A q or k projection [H*dh, d] with each head's rows reordered for half-split RoPE."""
    dh = weight.size(0) // n_heads
    return weight.view(n_heads, dh, -1)[:, rope_halves_order(dh)].reshape(weight.shape)


def _llama_weights(sd: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    d, ff = cfg.d_model, cfg.d_ff
    assert ff is not None
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].split(d, dim=0)
        w13 = sd[src + "mlp.w13.weight"]
        out.update(
            {
                dst + "input_layernorm.weight": sd[src + "norm1.weight"],
                dst + "self_attn.q_proj.weight": _rope_rows(q, cfg.n_heads),
                dst + "self_attn.k_proj.weight": _rope_rows(k, cfg.n_heads),
                dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": sd[src + "attn.out.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "norm2.weight"],
                dst + "mlp.gate_proj.weight": w13[:ff],
                dst + "mlp.up_proj.weight": w13[ff:],
                dst + "mlp.down_proj.weight": sd[src + "mlp.w2.weight"],
            }
        )
    return out


def _gpt2_weights(sd: dict[str, Tensor], cfg: TransformerConfig) -> dict[str, Tensor]:
    out = {
        "transformer.wte.weight": sd["embed.weight"],
        "transformer.wpe.weight": sd["pos_embed.weight"],
        "transformer.ln_f.weight": sd["norm.weight"],
        "transformer.ln_f.bias": sd["norm.bias"],
    }
    pairs = {
        "ln_1": "norm1",
        "ln_2": "norm2",
        "attn.c_attn": "attn.qkv",
        "attn.c_proj": "attn.out",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(cfg.n_layers):
        for dst, src in pairs.items():
            weight = sd[f"blocks.{i}.{src}.weight"]
            # GPT-2's Conv1D stores [in, out], nn.Linear [out, in]; norms are vectors.
            out[f"transformer.h.{i}.{dst}.weight"] = weight.t() if weight.dim() == 2 else weight
            out[f"transformer.h.{i}.{dst}.bias"] = sd[f"blocks.{i}.{src}.bias"]
    return out


def hf_config(cfg: TransformerConfig, eot_id: int | None) -> Any:
    """The transformers config of the native class for ``cfg.preset``."""
    import transformers

    ids: dict[str, Any] = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    assert cfg.max_seq_len is not None
    if cfg.preset == "gpt":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            activation_function="gelu_new",  # GELU's tanh approximation, as mmrec's GeluMLP
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=True,
            **ids,
        )
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        **ids,
    }
    if cfg.preset == "mistral":
        return transformers.MistralConfig(sliding_window=cfg.window, **common)
    return transformers.LlamaConfig(**common)


def to_hf_native(model: TransformerLM, eot_id: int | None = None) -> Any:
    """A transformers ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``GPT2LMHeadModel`` computing what
    ``model`` computes (float32, eval mode)."""
    import transformers

    cfg = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    weights = _gpt2_weights(sd, cfg) if cfg.preset == "gpt" else _llama_weights(sd, cfg)
    hf = getattr(transformers, HF_CLASSES[cfg.preset])(hf_config(cfg, eot_id))
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    # The head is tied to the embedding; transformers may list it as missing (it is the same tensor).
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"weight mapping to {HF_CLASSES[cfg.preset]} is incomplete: missing {missing}, unexpected {unexpected}"
        )
    hf.tie_weights()
    return hf.eval()
