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
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import TransformerConfig
from mmrec.layers.attention import causal_attention, rope
from mmrec.layers.basic import GeluMLP, SwiGLU
from mmrec.models.generation import GenerationMixin
from mmrec.models.output import LMOutput, check_input_ids, lm_loss
from mmrec.models.state import KVCache, KVStorage, StateError, collapse_positions, position_problem


class CacheUpdate:
    """How one forward call of T tokens reads and writes the KV cache: the same for every layer.

    Stream b holds its last n_b = min(p_b, T_cache) tokens in time order (see :class:`KVCache`); its T new
    tokens go to the slots after them, and its queries attend its own slots only (the last W of them with
    a sliding window of W tokens).

    Writes go in place into the state's :class:`KVStorage` when the state is the newest one written there
    (its ``heads``) and the storage is large enough. They only ever go past the slots a state holds, so a
    state stays valid after it has been decoded from, and decoding it again (a branch) copies it into new
    storage first. New storage has room to grow: twice the tokens kept (up to ``max_seq_len`` when that
    suffices). With a window, new storage keeps each stream's last W - 1 tokens only (all the next token
    attends) and holds at most 2 W: it is compacted once every ~W tokens. While autograd records, every
    layer's keys are new tensors instead: an in-place write would invalidate saved activations.
    """

    def __init__(self, state: KVCache, T: int, config: TransformerConfig) -> None:
        self.state, self.T, self.window = state, T, config.window
        self.max_len = config.max_seq_len or 0
        self.positions = state.positions
        self.filled = state.filled()
        self.device = state.keys.device
        uniform = len(set(self.positions)) == 1
        # RoPE and learned positions: one start for all rows, or one per row.
        self.start: int | Tensor = self.positions[0] if uniform else torch.tensor(self.positions, device=self.device)
        self.storage: KVStorage | None = None
        self.layers: list[tuple[Tensor, Tensor]] = []  # the new keys and values per layer, without storage
        self.kept: list[int] | None = None  # tokens of each stream kept before the new ones

    def _layout(self, kept: list[int]) -> None:
        """Where the new tokens go and what each row attends, after ``kept`` tokens per stream."""
        self.kept = kept
        after = [n + self.T for n in kept]
        self.length = max(after)  # slots of the new cache
        # Streams of different lengths: the slots each row may attend (None: every row all of them).
        self.key_lengths = None if len(set(after)) == 1 else torch.tensor(after, device=self.device)
        self.slots: slice | Tensor
        if len(set(kept)) == 1:
            self.slots = slice(kept[0], kept[0] + self.T)
        else:  # one token per row (mixed positions decode one token at a time), each at its own slot
            self.slots = torch.tensor(kept, device=self.device)[:, None, None, None]  # [B, 1, 1, 1]

    def _compacted_lengths(self) -> list[int]:
        W = self.window
        return list(self.filled) if W is None else [min(n, W - 1) for n in self.filled]

    def _compact(self, old: Tensor) -> Tensor:
        """The kept tokens of ``old`` [..., B, H, T_cache, dh] moved to the first slots (zeros after)."""
        assert self.kept is not None
        shifts = [n - k for n, k in zip(self.filled, self.kept, strict=True)]
        K = max(self.kept)
        if len(set(shifts)) == 1:
            return old[..., shifts[0] : shifts[0] + K, :]
        j = torch.arange(K, device=old.device)
        index = (torch.tensor(shifts, device=old.device)[:, None] + j).clamp(max=old.size(-2) - 1)  # [B, K]
        index = index[:, None, :, None].expand(*old.shape[:-2], K, old.size(-1))
        keep = (j < torch.tensor(self.kept, device=old.device)[:, None])[:, None, :, None]  # [B, 1, K, 1]
        return torch.where(keep, old.gather(-2, index), 0.0)

    def _prepare(self, dtype: torch.dtype, grad: bool) -> None:
        """Choose where this call writes, once the keys' dtype is known (the first layer)."""
        if self.kept is not None:
            return
        storage = self.state._storage
        if (
            not grad
            and storage is not None
            and storage.backs(self.state)
            and storage.keys.dtype == dtype
            and storage.heads == self.positions
            and max(self.filled) + self.T <= storage.capacity
        ):
            self.storage = storage
            self._layout(list(self.filled))
            return
        self._layout(self._compacted_lengths())
        if grad:
            return
        L, B, H, _, dh = self.state.keys.shape
        capacity = max(self.length, 2 * max(self.kept or [0]), 16)
        limit = self.max_len if self.window is None else 2 * self.window
        if self.length <= limit:
            capacity = min(capacity, limit)
        # Zeros: padding slots are attended with weight 0, which must not meet a NaN.
        keys = self.state.keys.new_zeros((L, B, H, capacity, dh), dtype=dtype)
        values = torch.zeros_like(keys)
        K = max(self.kept or [0])
        if K:
            keys[:, :, :, :K] = self._compact(self.state.keys)
            values[:, :, :, :K] = self._compact(self.state.values)
        self.storage = KVStorage(keys, values, self.positions)

    def _write(self, dest: Tensor, new: Tensor, in_place: bool) -> Tensor:
        """``new`` [B, H, T, dh] written into ``dest`` [B, H, S, dh] at the slots after the kept tokens."""
        new = new.to(dest.dtype)
        if isinstance(self.slots, slice):
            if in_place:
                dest[:, :, self.slots] = new
                return dest
            return torch.cat([dest[:, :, : self.slots.start], new, dest[:, :, self.slots.stop :]], dim=2)
        index = self.slots.expand(-1, new.size(1), -1, new.size(3))
        return dest.scatter_(2, index, new) if in_place else dest.scatter(2, index, new)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write layer ``layer``'s new keys and values k, v [B, H, T, dh]; the attention of q over the cache."""
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        self._prepare(k.dtype, grad)
        if self.storage is None:
            pad = (0, 0, 0, self.length - max(self.kept or [0]))
            old_k = F.pad(self._compact(self.state.keys[layer]).to(k.dtype), pad)
            old_v = F.pad(self._compact(self.state.values[layer]).to(v.dtype), pad)
            keys, values = self._write(old_k, k, False), self._write(old_v, v, False)
            self.layers.append((keys, values))
        else:
            keys = self._write(self.storage.keys[layer], k, True)[:, :, : self.length]
            values = self._write(self.storage.values[layer], v, True)[:, :, : self.length]
        return causal_attention(q, keys, values, self.window, self.key_lengths)

    def new_state(self) -> KVCache:
        heads = tuple(p + self.T for p in self.positions)
        position = collapse_positions(heads)
        W = self.window
        # A long call with a window (a prompt): keep only what the next token attends, in storage of 2 W.
        cut = W is not None and self.length > 2 * W
        if self.storage is None:
            keys = torch.stack([k for k, _ in self.layers])
            values = torch.stack([v for _, v in self.layers])
            if cut:  # a call of T > 1 tokens: every stream at one position, all slots filled
                keys, values = keys[:, :, :, -(W - 1) :], values[:, :, :, -(W - 1) :]  # type: ignore[operator]
            return KVCache(position=position, keys=keys, values=values, window=W)
        keys = self.storage.keys[:, :, :, : self.length]
        values = self.storage.values[:, :, :, : self.length]
        if cut:
            assert W is not None
            keep = keys.new_zeros((*keys.shape[:3], 2 * W, keys.size(4)))
            keep_v = torch.zeros_like(keep)
            keep[:, :, :, : W - 1] = keys[:, :, :, -(W - 1) :]
            keep_v[:, :, :, : W - 1] = values[:, :, :, -(W - 1) :]
            self.storage = KVStorage(keep, keep_v, heads)
            keys, values = keep[:, :, :, : W - 1], keep_v[:, :, :, : W - 1]
        self.storage.heads = heads
        state = KVCache(position=position, keys=keys, values=values, window=W)
        state._storage = self.storage
        return state


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bias = cfg.preset == "gpt"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)

    def forward(self, x: Tensor, cache: CacheUpdate, layer: int) -> Tensor:
        B, T, d = x.shape
        H, dh = self.cfg.n_heads, self.cfg.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, dh]
        if self.cfg.preset != "gpt":
            q, k = rope(q, cache.start, self.cfg.rope_theta), rope(k, cache.start, self.cfg.rope_theta)
        o = cache.attend(layer, q, k, v)  # [B, H, T, dh]
        return self.out(o.transpose(1, 2).reshape(B, T, d))


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

    def forward(self, x: Tensor, cache: CacheUpdate, layer: int) -> Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


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
        return KVCache(position=0, keys=empty, values=empty.clone(), window=c.window)

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
        if state.keys.shape != state.values.shape:
            raise StateError(f"state keys {tuple(state.keys.shape)} and values {tuple(state.values.shape)} differ")
        problem = position_problem(state.position, batch_size)
        if problem is not None:
            raise StateError(problem)
        if state.window != c.window:
            if state.window is not None:
                raise StateError(
                    f"state was made by a model with a sliding window of {state.window} tokens, this one has "
                    f"{c.window or 'none'}"
                )
            state = dataclasses.replace(state, window=c.window)  # a loaded state: its window is this model's
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
        """The final normed hidden states [B, T, d] and the new cache: ``forward`` without the head.

        Streams at different positions (a batched state of several) are decoded together one token at a
        time; a call of more tokens needs them at one position."""
        ids = check_input_ids(input_ids, self.config.vocab_size)
        B, T = ids.shape
        state = self.init_state(B) if state is None else self.check_state(state, B)
        positions = state.positions
        if T != 1 and len(set(positions)) > 1:
            raise StateError(
                f"the streams of this state are at different positions {state.position}: they can be decoded "
                f"together one token at a time, but a call of {T} tokens must feed the streams separately "
                "(prefill each stream alone, then cat the states and decode them together)"
            )
        x = self.embed(ids)  # [B, T, d]
        cache = CacheUpdate(state, T, self.config)
        if self.pos_embed is not None:
            if max(positions) + T > self.pos_embed.num_embeddings:
                raise ValueError(
                    f"the gpt preset learns positions for max_seq_len={self.config.max_seq_len} tokens; "
                    f"this call reaches position {max(positions) + T}. Use a shorter context or a larger "
                    "max_seq_len."
                )
            at = torch.arange(T, device=ids.device)
            x = x + self.pos_embed(at + (cache.start[:, None] if isinstance(cache.start, Tensor) else cache.start))
        for i, block in enumerate(self.layers):
            x = block(x, cache, i)
        return self.norm(x), cache.new_state()


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
