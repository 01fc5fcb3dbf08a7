"""Transformer baselines - "the other LLMs" - with MM-Rec's call signature.

One class, three presets: ``gpt`` (learned positions, LayerNorm, GELU MLP),
``llama`` (RoPE, RMSNorm, SwiGLU) and ``mistral`` (llama with sliding-window
attention). The state is the KV cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from mmrec.config import TransformerConfig
from mmrec.layers.attention import causal_attention, rope
from mmrec.layers.basic import GeluMLP, SwiGLU
from mmrec.models.generation import GenerationMixin
from mmrec.models.output import LMOutput, check_input_ids, lm_loss
from mmrec.models.state import KVCache, StateError


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bias = cfg.preset == "gpt"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        B, T, d = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, dh]
        if self.cfg.preset != "gpt":
            q, k = rope(q, start, self.cfg.rope_theta), rope(k, start, self.cfg.rope_theta)
        k = torch.cat([keys.to(k.dtype), k], dim=2)
        v = torch.cat([values.to(v.dtype), v], dim=2)
        o = causal_attention(q, k, v, self.cfg.window)
        if self.cfg.window is not None:  # later tokens never need more than window - 1 past keys
            k, v = (
                k[:, :, max(0, k.size(2) - (self.cfg.window - 1)) :],
                v[:, :, max(0, v.size(2) - (self.cfg.window - 1)) :],
            )
        return self.out(o.transpose(1, 2).reshape(B, T, d)), k, v


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        assert cfg.d_ff is not None
        norm = (
            (lambda: nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps))
            if cfg.preset == "gpt"
            else (lambda: nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps))
        )
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(cfg)
        self.mlp: nn.Module = GeluMLP(cfg.d_model, cfg.d_ff) if cfg.preset == "gpt" else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: Tensor, keys: Tensor, values: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
        y, keys, values = self.attn(self.norm1(x), keys, values, start)
        x = x + y
        return x + self.mlp(self.norm2(x)), keys, values


class TransformerLM(nn.Module, GenerationMixin):
    """Decoder-only Transformer LM; ``model(input_ids, state=None)`` -> LMOutput."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        assert config.max_seq_len is not None
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model) if config.preset == "gpt" else None
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = (
            nn.LayerNorm(config.d_model, eps=config.norm_eps)
            if config.preset == "gpt"
            else nn.RMSNorm(config.d_model, eps=config.norm_eps)
        )
        self.reset_parameters()

    @property
    def layers(self) -> list[TransformerBlock]:
        return cast(list[TransformerBlock], list(self.blocks))

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.layers:
            mlp = block.mlp
            w2 = mlp.fc2 if isinstance(mlp, GeluMLP) else cast(SwiGLU, mlp).w2
            for lin in (block.attn.out, w2):
                nn.init.normal_(lin.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def init_state(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for ``batch_size`` streams."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        c = self.config
        shape = (c.n_layers, batch_size, c.n_heads, 0, c.head_dim)
        empty = torch.zeros(shape, dtype=self.embed.weight.dtype, device=self.device)
        return KVCache(position=0, keys=empty, values=empty.clone())

    def check_state(self, state: Any, batch_size: int) -> KVCache:
        c = self.config
        if not isinstance(state, KVCache):
            raise StateError(
                f"state must be a KVCache (from init_state or a forward output), got {type(state).__name__}"
            )
        if state.batch_size != batch_size:
            raise StateError(f"state holds {state.batch_size} stream(s) but input_ids has batch size {batch_size}")
        for name, t in state.tensors().items():
            want = (c.n_layers, batch_size, c.n_heads, c.head_dim)
            got = (t.size(0), t.size(1), t.size(2), t.size(4)) if t.dim() == 5 else tuple(t.shape)
            if got != want:
                raise StateError(
                    f"state does not match this model: '{name}' has shape {tuple(t.shape)}, expected "
                    f"[{want[0]}, {want[1]}, {want[2]}, T, {want[3]}] (was it made by another config?)"
                )
            if t.device != self.device:
                raise StateError(f"state is on {t.device} but the model is on {self.device}; use state.to(device)")
        if not isinstance(state.position, int) or isinstance(state.position, bool) or state.position < 0:
            raise StateError(
                f"a KV cache has one position for all its streams, an integer >= 0; got {state.position!r}"
            )
        return state

    def forward(self, input_ids: Tensor, state: KVCache | None = None, targets: Tensor | None = None) -> LMOutput:
        hidden, new_state = self.hidden_states(input_ids, state)
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = lm_loss(logits, targets) if targets is not None else None
        return LMOutput(logits=logits, state=new_state, loss=loss)

    def lm_head(self, hidden: Tensor) -> Tensor:
        """Logits of final hidden states [..., d] (the head is tied to the embedding)."""
        return hidden @ self.embed.weight.t()

    def hidden_states(self, input_ids: Tensor, state: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """The final normed hidden states [B, T, d] and the new cache: ``forward`` without the head."""
        ids = check_input_ids(input_ids, self.config.vocab_size)
        B, T = ids.shape
        state = self.init_state(B) if state is None else self.check_state(state, B)
        start = state.position
        x = self.embed(ids)
        if self.pos_embed is not None:
            if start + T > self.pos_embed.num_embeddings:
                raise ValueError(
                    f"the gpt preset learns positions for max_seq_len={self.config.max_seq_len} tokens; "
                    f"this call reaches position {start + T}. Use a shorter context or a larger max_seq_len."
                )
            x = x + self.pos_embed(torch.arange(start, start + T, device=ids.device))
        keys, values = [], []
        for i, block in enumerate(self.layers):
            x, k, v = block(x, state.keys[i], state.values[i], start)
            keys.append(k)
            values.append(v)
        new_state = KVCache(position=start + T, keys=torch.stack(keys), values=torch.stack(values))
        return self.norm(x), new_state


def count_transformer_params(cfg: TransformerConfig) -> int:
    """Parameters of a TransformerLM built from ``cfg``, without building it."""
    with torch.device("meta"):
        return TransformerLM(cfg).num_parameters()


def matched_transformer_config(target_params: int, **kwargs: Any) -> TransformerConfig:
    """A TransformerConfig whose parameter count is as close as possible to ``target_params``.

    d_model, n_layers and the rest come from ``kwargs``; the MLP width ``d_ff``
    (a multiple of 16) is chosen to match. Raises if even d_ff=16 is too big.
    """
    base = TransformerConfig(**{**kwargs, "d_ff": 16})
    per_unit = count_transformer_params(dataclasses.replace(base, d_ff=32)) - count_transformer_params(base)
    fixed = count_transformer_params(base) - per_unit
    if target_params < fixed + per_unit:
        raise ValueError(
            f"cannot match {target_params:,} parameters: this shape needs {fixed + per_unit:,} at the "
            "smallest MLP; lower d_model or n_layers"
        )
    units = max(1, round((target_params - fixed) / per_unit))
    return dataclasses.replace(base, d_ff=16 * units)
