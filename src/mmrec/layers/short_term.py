"""Level 0 of MM-Rec: the short-term memory h_t, a gated linear recurrence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmrec.config import MMRecConfig
from mmrec.layers.basic import CausalConv, rms_norm_step
from mmrec.ops import delta_chunked, delta_step, gla_chunked, gla_step
from mmrec.ops.scan import accumulation_dtype


class ShortTermMixer(nn.Module):
    """Multi-head gated linear recurrence with a matrix state per head.

        q, k, v = W_{q,k,v} silu(conv(x));   log g = logsigmoid(W_g x + b_g) / tau
        S_t = g_t S_{t-1} + k_t^T v_t;       o_t = q_t S_t
        y = W_o (rmsnorm_head(o) * sigmoid(W_r x))

    With ``selective_write`` (Mamba-2's selection) the decay is computed from
    the convolved features, like q, k, v, and the write is ``(1 - g_t) k_t^T v_t``:
    the step size scales both the decay and the input, so a token whose gate
    keeps the state (g near 1) adds almost nothing to it. ``sparse_write``
    multiplies the step size by ``relu(W_s x + b_s)``: a token whose gate is
    at or below zero leaves the state exactly as it was (g = 1, no write), so
    a learned "ignore this token" holds at any length, not just approximately.

    With ``short_term="delta"`` the update is the gated delta rule
    (:mod:`mmrec.ops.delta`): ``S_t = g_t (I - b_t k_t^T k_t) S_{t-1} + b_t k_t^T v_t``
    with unit-norm q and k and a write step ``b = sigmoid(W_b xc)`` per head, so a
    write replaces what key k held instead of adding to it. ``b`` is the write's
    step size there: k is not scaled by (1 - g); ``sparse_write`` multiplies ``b``
    by its gate (at most 1), so a switched-off token still leaves the state as it was.

    The decay depends on the input only, never on the state, so the whole
    sequence is computed in parallel (chunked form) and exactly equals the
    token-by-token step used for decoding.
    """

    def __init__(self, cfg: MMRecConfig) -> None:
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim = H, cfg.head_dim
        self.tau = cfg.decay_tau
        self.selective_write = cfg.selective_write
        self.sparse_write = cfg.sparse_write
        self.delta = cfg.short_term == "delta"
        self.last_gate_mean: Tensor | None = None
        assert cfg.scan_chunk is not None
        self.chunk: int = cfg.scan_chunk
        self.scan_block = cfg.scan_block
        self.conv = CausalConv(d, cfg.conv_size) if cfg.conv_size > 0 else None
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        # Sparse writes add a second output per head: the gate that can switch a token off.
        self.decay = nn.Linear(d, 2 * H if self.sparse_write else H)
        # The delta rule's write step per head, from the convolved features like q, k, v.
        self.beta = nn.Linear(d, H) if self.delta else None
        self.out_gate = nn.Linear(d, d, bias=False)
        self.head_norm = nn.Parameter(torch.ones(d))
        self.out = nn.Linear(d, d, bias=False)
        self.norm_eps = cfg.norm_eps
        # Spread the initial decays over time scales, geometrically in 1/(1-g):
        # the heads start with memories from ~1/(1-decay_min) to ~1/(1-decay_max) tokens.
        assert cfg.decay_min is not None  # filled in by MMRecConfig
        horizons = torch.logspace(math.log10(1 / (1 - cfg.decay_min)), math.log10(1 / (1 - cfg.decay_max)), H)
        gamma = 1 - 1 / horizons
        # logsigmoid(b) / tau = log(gamma)  =>  b = logit(gamma ** tau)
        self._decay_bias_init = torch.logit(gamma.double() ** self.tau).float()

    def reset_decay(self) -> None:
        with torch.no_grad():
            H = self.n_heads
            self.decay.bias[:H].copy_(self._decay_bias_init)
            if self.sparse_write:
                self.decay.bias[H:].fill_(1.0)  # every token writes at first
            if self.beta is not None:
                self.beta.bias.zero_()  # beta = 1/2 at first

    def _decay_and_gate(self, gate_in: Tensor) -> tuple[Tensor, Tensor | None]:
        """log g_t [..., H] in float32 and, with ``sparse_write``, the gate relu(W_s x + b_s) it includes."""
        z = F.linear(gate_in, self.decay.weight, self.decay.bias)
        z = z if z.dtype == torch.float32 else z.float()
        if not self.sparse_write:
            # x / 1 is x: one op fewer.
            return (F.logsigmoid(z) if self.tau == 1 else F.logsigmoid(z) / self.tau), None
        z, s = z.split(self.n_heads, dim=-1)
        gate = F.relu(s)
        # Kept for a sparsity penalty on the gates (MMRecLM.write_gate_mean): training only.
        self.last_gate_mean = gate.mean() if self.training else None
        return F.logsigmoid(z) / self.tau * gate, gate

    def _delta_inputs(self, xc: Tensor, q: Tensor, k: Tensor, gate_in: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The delta rule's unit q and k and beta [..., H] in the state's dtype, log g [..., H] in float32."""
        assert self.beta is not None
        acc = accumulation_dtype(q.dtype)
        q = F.normalize(q.to(acc), dim=-1) * self.head_dim**-0.5
        k = F.normalize(k.to(acc), dim=-1)
        log_g, gate = self._decay_and_gate(gate_in)
        beta = torch.sigmoid(self.beta(xc).to(acc))
        if gate is not None:
            # Where the gate is 0, log g is 0 too: no decay and no write, the state stays exactly as it was.
            beta = beta * gate.clamp(max=1).to(acc)
        return q, k, log_g, beta

    def log_decay(self, gate_in: Tensor) -> Tensor:
        """log g_t per head, [B, T, H] in float32, from the gate input [B, T, d]."""
        return self._decay_and_gate(gate_in)[0]

    def forward(self, x: Tensor, S: Tensor, conv_tail: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, d]; S: [B, H, dk, dv]; conv_tail: [B, K-1, d]."""
        B, T, d = x.shape
        H, dh = self.n_heads, self.head_dim
        if T == 1:
            y, S, conv_tail = self.step(x[:, 0], S, conv_tail)
            return y.unsqueeze(1), S, conv_tail
        if self.conv is not None:
            xc, conv_tail = self.conv(x, conv_tail)
            xc = F.silu(xc)
        else:
            xc = x
        q, k, v = self.qkv(xc).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, dh]
        # Selective: the decay sees the convolved features, as Mamba's step size does, so it can depend on
        # the previous tokens (e.g. write the token that follows a marker).
        gate_in = xc if self.selective_write else x
        if self.delta:
            q, k, log_g, beta = self._delta_inputs(xc, q, k, gate_in)
            o, S = delta_chunked(q, k, v, log_g.transpose(1, 2), beta.transpose(1, 2), S, self.chunk)
        else:
            q = q * dh**-0.5
            log_g = self.log_decay(gate_in).transpose(1, 2)  # [B, H, T]
            if self.selective_write:  # S_t = g_t S_{t-1} + (1 - g_t) k_t^T v_t
                k = k * (-torch.expm1(log_g)).unsqueeze(-1).to(k.dtype)
            o, S = gla_chunked(q, k, v, log_g, S, self.chunk, self.scan_block)
        o = o.transpose(1, 2)  # [B, T, H, dh]
        o = F.rms_norm(o, (dh,), eps=self.norm_eps).reshape(B, T, d) * self.head_norm
        y = self.out(o * torch.sigmoid(self.out_gate(x)))
        return y, S, conv_tail

    def step(self, x: Tensor, S: Tensor, conv_tail: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token per stream (decoding): x [B, d]; the same maths as :meth:`forward` in fewer ops."""
        B, d = x.shape
        H, dh = self.n_heads, self.head_dim
        if self.conv is not None:
            xc, conv_tail = self.conv.step(x, conv_tail)
            xc = F.silu(xc)
        else:
            xc = x
        q, k, v = F.linear(xc, self.qkv.weight).view(B, 3, H, dh).unbind(1)  # 3 x [B, H, dh]
        if self.delta:
            q, k, log_g, beta = self._delta_inputs(xc, q, k, xc if self.selective_write else x)
            o, S = delta_step(q, k, v, log_g, beta, S)  # [B, H, dh]
        else:
            log_g = self.log_decay(xc if self.selective_write else x)  # [B, H]
            if self.selective_write:
                k = k * (-torch.expm1(log_g)).unsqueeze(-1).to(k.dtype)
            o, S = gla_step(q * dh**-0.5, k, v, log_g, S)  # [B, H, dh]
        o = rms_norm_step(o, None, self.norm_eps).view(B, d) * self.head_norm
        return F.linear(o * torch.sigmoid(F.linear(x, self.out_gate.weight)), self.out.weight), S, conv_tail
