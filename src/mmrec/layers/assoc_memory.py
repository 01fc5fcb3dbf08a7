"""An associative long-term memory as a layer: a key-value matrix per head, written once per chunk.

The maths lives in :mod:`mmrec.ops.assoc`; this layer owns the projections. From the (normed) block
input x, per head:

    q, k = unit(W_q x), unit(W_k x);   v = W_v x;   beta = sigmoid(W_b x + b_b)
    log g = logsigmoid(W_g x + b_g) / C                  C = chunk_size
    o_t = q_t A_c                                         A_c: the memory after the chunks before t's
    y = W_o o                                             W_o starts at zero

Every completed chunk is written into ``A`` by the gated delta rule, token by token, so a key written
with ``beta`` near 1 replaces what it held: the memory stores associations (key -> value), not pooled
summaries. The division by C makes ``sigmoid(W_g x + b_g)`` the decay *per chunk* of a chunk whose
tokens all agree (the decays multiply over its C tokens), so ``b_g`` reads as a per-chunk retention:
it starts spread over heads from ``decay_min`` to ``decay_max`` (geometric in the horizon
1 / (1 - decay), 10 to 1,000 chunks at the defaults). ``beta`` starts at 1/2 for every token.

The output projection starts at zero, so adding ``x + AssociativeMemory(norm(x))`` to a model starts
as the identity of the residual stream. A model that re-initialises every matrix must call
:meth:`AssociativeMemory.reset_parameters` after it (as with ``ShortTermMixer.reset_decay``).

State per stream (:class:`~mmrec.ops.assoc.AssocState`, float32): the memory [H, dk, dv] and the
unfinished chunk's keys [H, C, dk], values [H, C, dv], decays and betas [H, C]: ``4 H (dk dv + C (dk
+ dv + 2))`` bytes. At d_model 256, 4 heads (dk = dv = 64), chunk 64: 65,536 (memory) + 65,536 (keys)
+ 65,536 (values) + 2 x 1,024 = 198,656 bytes (194 KiB) per stream and layer, whatever the length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.ops.assoc import AssocState, assoc_chunked, assoc_init_state, assoc_step
from mmrec.ops.delta import delta_chunk_states
from mmrec.ops.scan import accumulation_dtype


class AssociativeMemory(nn.Module):
    """Reads a per-head key-value memory of the completed chunks; writes each chunk by the delta rule."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        chunk_size: int = 64,
        head_dim: int | None = None,
        decay_min: float = 0.9,
        decay_max: float = 0.999,
    ) -> None:
        super().__init__()
        if heads < 1 or chunk_size < 1:
            raise ValueError(f"heads and chunk_size must be >= 1; got heads={heads}, chunk_size={chunk_size}")
        if head_dim is None:
            if d_model % heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads}) unless head_dim is given")
            head_dim = d_model // heads
        if not 0 < decay_min <= decay_max < 1:
            raise ValueError(f"need 0 < decay_min <= decay_max < 1; got {decay_min}, {decay_max}")
        self.heads, self.head_dim, self.chunk_size = heads, head_dim, chunk_size
        self.decay_min, self.decay_max = decay_min, decay_max
        inner = heads * head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.beta = nn.Linear(d_model, heads)
        self.decay = nn.Linear(d_model, heads)
        self.out = nn.Linear(inner, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero output projection; decays spread over heads and independent of the token; beta = 1/2."""
        with torch.no_grad():
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.decay.weight)
            horizons = torch.logspace(
                math.log10(1 / (1 - self.decay_min)),
                math.log10(1 / (1 - self.decay_max)),
                self.heads,
                dtype=torch.float64,
            )
            self.decay.bias.copy_(torch.logit(1 - 1 / horizons))
            nn.init.zeros_(self.beta.bias)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> AssocState:
        """Fresh streams: an empty memory and no pending token (float32 state; float64 for a float64 model)."""
        d = self.head_dim
        return assoc_init_state(batch_size, self.heads, d, d, self.chunk_size, dtype, device)

    def state_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of one stream's state: ``4 H (dk dv + C (dk + dv + 2))`` in float32."""
        H, d, C = self.heads, self.head_dim, self.chunk_size
        return H * (d * d + C * (2 * d + 2)) * torch.empty((), dtype=dtype).element_size()

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v [..., H, d] and log g, beta [..., H] from x [..., d_model]; all but v in the state's dtype."""
        acc = accumulation_dtype(x.dtype)
        q, k, v = F.linear(x, self.qkv.weight).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)
        q, k = F.normalize(q.to(acc), dim=-1), F.normalize(k.to(acc), dim=-1)
        log_g = F.logsigmoid(self.decay(x).to(acc)) / self.chunk_size
        beta = torch.sigmoid(self.beta(x).to(acc))
        return q, k, v, log_g, beta

    def forward(self, x: Tensor, state: AssocState | None = None) -> tuple[Tensor, AssocState]:
        """x [B, T, d_model] -> (y [B, T, d_model], new state). A fresh state when ``state`` is None."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, accumulation_dtype(x.dtype))
        if T == 1:  # also the one path for streams with different n_pending
            y, state = self.step(x[:, 0], state)
            return y.unsqueeze(1), state
        q, k, v, log_g, beta = (t.transpose(1, 2) for t in self._inputs(x))  # [B, H, T, ...]
        o, state = assoc_chunked(q, k, v, log_g, beta, state)  # [B, H, T, dv]
        return self.out(o.transpose(1, 2).flatten(2)), state

    def step(self, x: Tensor, state: AssocState) -> tuple[Tensor, AssocState]:
        """One token per stream (decoding): x [B, d_model] -> (y [B, d_model], new state)."""
        o, state = assoc_step(*self._inputs(x), state)  # [B, H, dv]
        return self.out(o.flatten(1)), state

    def read_step(
        self, x: Tensor, memory: Tensor, pending: Sequence[Tensor], keep: Tensor, row: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """:meth:`step` without its chunk write and with no Python branch on positions (for a decoder that
        writes completed chunks after every layer has read, as MM-Rec's does): x [B, d_model] reads
        ``memory`` [B, H, dk, dv] and joins ``pending`` (keys, values, log_g, beta of the unfinished
        chunk) in its stream's row. ``keep``, ``row`` [C, 1] or [B, C, 1] (0/1 in the state's dtype, from
        :func:`~mmrec.layers.memory.decode_masks`): the rows before the token, and the token's row.
        Returns y [B, d_model] and the new pending tensors; :meth:`write_rows` then writes the streams
        whose chunk the token completed."""
        q, k, v, log_g, beta = self._inputs(x)  # q, k, v [B, H, d]; log_g, beta [B, H]
        acc = memory.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            o = (q.to(acc).unsqueeze(-2) @ memory).squeeze(-2)  # [B, H, dv]
            C = pending[0].size(2)
            keep4, row4 = keep.reshape(-1, 1, C, 1), row.reshape(-1, 1, C, 1)  # [1 or B, 1, C, 1]
            keys, values, log_gs, betas = pending
            # Earlier rows kept, the token in its row, zeros after it (as assoc_step and the chunked form).
            new = (
                torch.addcmul(keys * keep4, row4, k.to(acc).unsqueeze(2)),
                torch.addcmul(values * keep4, row4, v.to(acc).unsqueeze(2)),
                torch.addcmul(log_gs * keep4[..., 0], row4[..., 0], log_g.unsqueeze(2)),
                torch.addcmul(betas * keep4[..., 0], row4[..., 0], beta.unsqueeze(2)),
            )
        return self.out(o.to(v.dtype).flatten(1)), new

    @staticmethod
    def write_rows(
        memory: Tensor, pending: Sequence[Tensor], done: list[int] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Write the completed chunks held in ``pending`` (keys [B, H, C, dk], values, log_g, beta) into
        ``memory`` [B, H, dk, dv] for the streams ``done`` ([] none, None all) and empty their pending rows;
        the other streams keep their tensors. No parameters: streams of several layers may be written in one
        call (flattened into B)."""
        keys, values, log_g, beta = pending
        if done is not None and not done:
            return memory, (keys, values, log_g, beta)
        C = keys.size(2)
        if done is None:
            _, memory = delta_chunk_states(keys, values, log_g, beta, memory, C)
            return memory, (
                torch.zeros_like(keys),
                torch.zeros_like(values),
                torch.zeros_like(log_g),
                torch.zeros_like(beta),
            )
        idx = torch.tensor(done, device=memory.device)
        k, v, g, b = (t.index_select(0, idx) for t in pending)
        _, written = delta_chunk_states(k, v, g, b, memory.index_select(0, idx), C)
        emptied = tuple(t.index_fill(0, idx, 0.0) for t in pending)
        return memory.index_copy(0, idx, written), (emptied[0], emptied[1], emptied[2], emptied[3])
