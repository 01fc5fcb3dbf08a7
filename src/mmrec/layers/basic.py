"""Small building blocks shared by MM-Rec and the Transformer baselines."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@functools.lru_cache(maxsize=64)
def _scalar(value: float, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A kept 0-d tensor (a 0-d tensor takes the dtype of the others in arithmetic, but keeps its own
    rounding of ``value``: float64 for float64 arithmetic, or eps would be rounded to float32)."""
    return torch.tensor(value, dtype=dtype, device=device)


def rms_norm_step(x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    """``F.rms_norm(x, (d,), weight, eps)`` over the last axis for the one-token decoding path: the
    squared norm comes from one fused reduction. On the CPU (torch 2.13) F.rms_norm runs as a chain
    of seven small kernels: 38 us for one token of d=256 against 24 us here (2-core VM, 1 thread)."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # F.rms_norm's default
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if torch.compiler.is_compiling():  # the compiler fuses it all; a cached tensor would be a graph constant
        return (x * torch.rsqrt(n * n / x.size(-1) + eps)) * (1 if weight is None else weight)
    eps_t = _scalar(eps, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = x * torch.rsqrt(torch.addcmul(eps_t, n, n, value=1 / x.size(-1)))
    return y if weight is None else y * weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), as in LLaMA."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """fc2(gelu(fc1 x)), as in GPT-2."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CausalConv(nn.Module):
    """Depthwise causal convolution over time, with a carried tail for streaming.

    ``tail`` holds the last ``kernel_size - 1`` inputs [B, K-1, D], so that
    convolving a sequence in pieces equals convolving it whole.
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        # nn.Conv1d's default for a depthwise filter: uniform in +-1/sqrt(K).
        nn.init.uniform_(self.weight, -(kernel_size**-0.5), kernel_size**-0.5)

    def forward(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        # x: [B, T, D]; tail: [B, K-1, D]
        T = x.size(1)
        if T == 0:
            return x, tail
        if T == 1:
            y, new_tail = self.step(x[:, 0], tail)
            return y.unsqueeze(1), new_tail
        full = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        new_tail = full[:, full.size(1) - (self.kernel_size - 1) :].to(tail.dtype)
        # A contiguous [B, D, T] input: conv backward on the transposed view took 38 ms instead of 25
        # (B 32, T 512, D 128, 2 threads) and far longer when the cores were oversubscribed.
        xt = full.transpose(1, 2).contiguous()
        y = F.conv1d(xt, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=x.size(-1))
        return y.transpose(1, 2), new_tail

    def step(self, x: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
        """One input per stream (decoding), x [B, D]: a weighted sum beats a convolution call."""
        dtype = x.dtype
        full = torch.cat([tail if tail.dtype == dtype else tail.to(dtype), x.unsqueeze(1)], dim=1)  # [B, K, D]
        weight: Tensor = self.weight
        bias: Tensor = self.bias
        if weight.dtype != dtype:
            weight, bias = weight.to(dtype), bias.to(dtype)
        y = (full * weight.view(-1, self.kernel_size).t()).sum(1) + bias  # [B, D]
        new_tail = full[:, 1:]
        return y, new_tail if new_tail.dtype == tail.dtype else new_tail.to(tail.dtype)
