"""Small building blocks shared by MM-Rec and the Transformer baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        full = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K-1+T, D]
        new_tail = full[:, full.size(1) - (self.kernel_size - 1) :].to(tail.dtype)
        if T == 1:  # decoding: a weighted sum beats a convolution call
            y = torch.einsum("bkd,dk->bd", full, self.weight[:, 0].to(x.dtype)) + self.bias.to(x.dtype)
            return y.unsqueeze(1), new_tail
        # A contiguous [B, D, T] input: conv backward on the transposed view took 38 ms instead of 25
        # (B 32, T 512, D 128, 2 threads) and far longer when the cores were oversubscribed.
        xt = full.transpose(1, 2).contiguous()
        y = F.conv1d(xt, self.weight.to(x.dtype), self.bias.to(x.dtype), groups=x.size(-1))
        return y.transpose(1, 2), new_tail
