"""Gated delta rule: a write replaces what a key held instead of adding to it.

For each head, with key width dk and value width dv (Gated DeltaNet, Yang, Kautz
and Hatamizadeh, ICLR 2025, written here in :mod:`mmrec.ops.gla`'s layout, the
state ``S`` in R^{dk x dv} and row vectors):

    S_t = exp(log_g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    o_t = q_t S_t

Equivalently: decay the state, read what key ``k_t`` holds (``k_t S``), and
move it a fraction ``beta_t`` of the way to ``v_t``. With ``|k_t| = 1``,
``beta_t = 1`` and no decay, reading ``k_t`` afterwards gives exactly ``v_t``,
whatever was written under ``k_t`` before; gated linear attention
(:mod:`mmrec.ops.gla`) would give the sum of both writes.

Three implementations of one contract:

* :func:`delta_naive`   - a step loop; the reference for tests.
* :func:`delta_chunked` - training and prefill: inside a chunk the writes
  ``U`` solve one unit-lower-triangular system (the WY / UT transform; the
  inverse by doubling diagonal blocks, matrix products only), then
  outputs are masked matrix products; a loop over chunks (not tokens) passes
  the state.
* :func:`delta_step`    - one token, for decoding.

Shapes as in :mod:`mmrec.ops.gla`: q, k [B, H, T, dk]; v [B, H, T, dv];
log_g, beta [B, H, T]; state [B, H, dk, dv]. Each returns (o, final state).
The state is accumulated in float32 (float64 for float64 inputs); outputs come
back in v's dtype.

Contract on the inputs (not checked here: it would cost a reduction and a
device sync per call): ``k`` is L2-normalised over dk by the caller and
``beta`` lies in [0, 1] (a sigmoid). Then ``I - beta k^T k`` has eigenvalues in
[1 - beta, 1] and the state never grows. The op itself does not normalise
because the layer also normalises ``q`` (Gated DeltaNet does both) and scales
``q`` as it sees fit, exactly as with :func:`~mmrec.ops.gla.gla_chunked`. The
three implementations agree for any k and beta; only stability needs them.

The chunked form follows the reference PyTorch implementation in
flash-linear-attention (``fla/ops/gated_delta_rule/naive.py``:
``naive_recurrent_gated_delta_rule`` and ``naive_chunk_gated_delta_rule``, by
Songlin Yang and Yu Zhang), with three changes: the decay factors inside a
chunk come from segment sums (:func:`mmrec.ops.scan.segsum`, every factor
<= 1 and exact for very strong decays) rather than differences of prefix sums;
the triangular system is inverted by doubling diagonal blocks (log2 C levels
of batched matrix products) instead of a Python loop over rows; and no query
scale is applied here.

Derivation of the chunked form. In one chunk (positions i = 0..C-1) with the
state ``S0`` entering it and ``G_i = sum_{m<=i} log_g_m``, let
``u_i = beta_i (v_i - k_i exp(log_g_i) S_{i-1})`` be the write of step i, so
that ``S_i = exp(G_i) S0 + sum_{j<=i} exp(G_i - G_j) k_j^T u_j``. Substituting:

    u_i + beta_i sum_{j<i} exp(G_i - G_j) (k_i . k_j) u_j = beta_i v_i - beta_i exp(G_i) k_i S0

that is ``(I + A) U = diag(beta) V - diag(beta exp(G)) K S0`` with ``A``
strictly lower triangular, hence ``U = W_v - W_k S0``. Then
``O = diag(exp(G)) Q S0 + (Q K^T * D) U`` with ``D_ij = exp(G_i - G_j)`` for
``j <= i`` and the state leaving the chunk is
``exp(G_{C-1}) S0 + (K * D_{C-1, :})^T U``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmrec.ops.scan import accumulation_dtype, segsum


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor, state: Tensor | None) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, H, T, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [B, H, T, dv] = [{B}, {H}, {T}, dv]; got {tuple(v.shape)}")
    for name, t in (("log_g", log_g), ("beta", beta)):
        if t.shape != (B, H, T):
            raise ValueError(f"{name} must be [B, H, T] = [{B}, {H}, {T}]; got {tuple(t.shape)}")
    if state is not None and state.shape != (B, H, dk, v.size(-1)):
        raise ValueError(f"state must be [B, H, dk, dv] = [{B}, {H}, {dk}, {v.size(-1)}]; got {tuple(state.shape)}")


def _initial_state(q: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    B, H, _, dk = q.shape
    acc = accumulation_dtype(v.dtype)
    if state is None:
        return torch.zeros(B, H, dk, v.size(-1), dtype=acc, device=v.device)
    return state.to(acc)


def _update(S: Tensor, k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor) -> Tensor:
    """One step of the recurrence in the state's dtype. k [B, H, dk]; v [B, H, dv]; log_g, beta [B, H]."""
    S = torch.exp(log_g)[..., None, None] * S
    held = (k.unsqueeze(-2) @ S).squeeze(-2)  # [B, H, dv]: what key k reads now
    write = beta.unsqueeze(-1) * (v - held)  # [B, H, dv]
    return S + k.unsqueeze(-1) * write.unsqueeze(-2)


def delta_naive(
    q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one token at a time. Returns (o, final state)."""
    _check_shapes(q, k, v, log_g, beta, state)
    S = _initial_state(q, v, state)
    acc = S.dtype
    outs = []
    for t in range(q.size(2)):
        S = _update(S, k[:, :, t].to(acc), v[:, :, t].to(acc), log_g[:, :, t].to(acc), beta[:, :, t].to(acc))
        outs.append((q[:, :, t, None, :].to(acc) @ S).squeeze(-2))
    if not outs:
        return v.new_zeros(v.shape), S
    return torch.stack(outs, dim=2).to(v.dtype), S


def delta_step(q: Tensor, k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decoding step. q, k [B, H, dk]; v [B, H, dv]; log_g, beta [B, H]; state [B, H, dk, dv]."""
    _check_shapes(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), log_g.unsqueeze(2), beta.unsqueeze(2), state)
    acc = accumulation_dtype(v.dtype)
    with torch.autocast(device_type=v.device.type, enabled=False):
        S = _update(state.to(acc), k.to(acc), v.to(acc), log_g.to(acc), beta.to(acc))
        o = (q.to(acc).unsqueeze(-2) @ S).squeeze(-2)
    return o.to(v.dtype), S


def _unit_lower_inverse(M: Tensor) -> Tensor:
    """Inverse of unit-lower-triangular matrices [..., C, C], by doubling diagonal blocks.

    The blocks on the diagonal start as 1 x 1 (the unit diagonal) and each
    level merges neighbours: ``[[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]]``,
    so log2(C) levels of batched matrix products do it. On CPU (torch 2.13) this
    ran about twice as fast as ``torch.linalg.solve_triangular`` forward on
    [256, 64, 64] systems and its backward is matrix products too; its error in
    float32 against a float64 inverse was that of the triangular solve
    (~1e-7 relative) for unit keys with beta = 1, the worst conditioning the
    delta rule produces. C is padded to a power of two with the identity.
    """
    *batch, C, _ = M.shape
    P = 1 << (C - 1).bit_length()
    if P != C:
        M = torch.cat([M, M.new_zeros(*batch, C, P - C)], dim=-1)
        tail = torch.eye(P, dtype=M.dtype, device=M.device)[C:].expand(*batch, P - C, P)
        M = torch.cat([M, tail], dim=-2)
    D = M.new_ones(*batch, P, 1, 1)  # inverses of the diagonal blocks, [..., P / b, b, b]
    b = 1
    while b < P:
        n = P // (2 * b)
        # The diagonal blocks of size 2b of M: [..., n, 2b, 2b].
        blocks = torch.diagonal(M.reshape(*batch, n, 2 * b, n, 2 * b), dim1=-4, dim2=-2).movedim(-1, -3)
        X, Z = D[..., 0::2, :, :], D[..., 1::2, :, :]
        lower = -(Z @ blocks[..., b:, :b] @ X)
        D = torch.cat([torch.cat([X, torch.zeros_like(X)], dim=-1), torch.cat([lower, Z], dim=-1)], dim=-2)
        b *= 2
    return D[..., 0, :C, :C]


def _chunk_pass(
    kc: Tensor, vc: Tensor, g: Tensor, b: Tensor, S: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The WY / UT pass over whole chunks, in the accumulation dtype: kc [B, H, n, C, dk], vc
    [B, H, n, C, dv], g [B, H, n, C] (log decays), b [B, H, n, C, 1] (betas), S the entering state.
    Returns the in-chunk decays exp(G_i - G_j) [B, H, n, C, C], the cumulative log decays G
    [B, H, n, C, 1], the states entering each chunk [B, H, n, dk, dv], the chunks' writes U
    [B, H, n, C, dv] and the final state."""
    C, dk, dv = kc.size(-2), kc.size(-1), vc.size(-1)
    decay = torch.exp(segsum(g))  # [B, H, n, C, C]: exp(G_i - G_j) for j <= i, else 0; all <= 1
    G = g.cumsum(-1).unsqueeze(-1)  # [B, H, n, C, 1]
    kk = kc @ kc.transpose(-1, -2)  # [B, H, n, C, C]
    A = (b * kk * decay).tril(-1)  # strictly lower triangular
    eye = torch.eye(C, dtype=S.dtype, device=S.device)
    rhs = torch.cat([b * vc, b * torch.exp(G) * kc], dim=-1)  # [B, H, n, C, dv + dk]
    W = _unit_lower_inverse(eye + A) @ rhs  # [B, H, n, C, dv + dk]
    W_v, W_k = W.split([dv, dk], dim=-1)  # U = W_v - W_k S0

    k_to_end = kc * decay[..., -1, :].unsqueeze(-1)  # [B, H, n, C, dk]: k_j exp(G_{C-1} - G_j)
    chunk_decay = torch.exp(G[..., -1, :]).unsqueeze(-1)  # [B, H, n, 1, 1]

    # Unbind once: indexing inside the loop would make backward zero-fill
    # a full-size gradient per chunk.
    W_v_c, W_k_c = W_v.unbind(2), W_k.unbind(2)
    k_end_c, decay_c = k_to_end.unbind(2), chunk_decay.unbind(2)
    entering, writes = [], []
    for c in range(len(W_v_c)):
        entering.append(S)
        U = W_v_c[c] - W_k_c[c] @ S  # [B, H, C, dv]
        writes.append(U)
        S = decay_c[c] * S + k_end_c[c].transpose(-1, -2) @ U
    return decay, G, torch.stack(entering, dim=2), torch.stack(writes, dim=2), S


def delta_chunk_states(
    k: Tensor, v: Tensor, log_g: Tensor, beta: Tensor, state: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The gated delta rule's states at chunk boundaries: those entering each chunk and the final one.

    k [B, H, n * C, dk]; v [B, H, n * C, dv]; log_g, beta [B, H, n * C]; state [B, H, dk, dv] (its dtype is
    the accumulation dtype). Returns (entering [B, H, n, dk, dv], final [B, H, dk, dv]): the state pass of
    :func:`delta_chunked` without the outputs.
    """
    B, H, T, dk = k.shape
    dv, acc, C = v.size(-1), state.dtype, chunk_size
    if T % C:
        raise ValueError(f"delta_chunk_states takes whole chunks: {T} tokens are not a multiple of {C}")
    n = T // C
    if n == 0:
        return state.new_zeros(B, H, 0, dk, dv), state
    with torch.autocast(device_type=v.device.type, enabled=False):
        kc = k.to(acc).reshape(B, H, n, C, dk)
        vc = v.to(acc).reshape(B, H, n, C, dv)
        g = log_g.to(acc).reshape(B, H, n, C)
        b = beta.to(acc).reshape(B, H, n, C, 1)
        _, _, entering, _, final = _chunk_pass(kc, vc, g, b, state)
    return entering, final


def delta_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_g: Tensor,
    beta: Tensor,
    state: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked parallel form (WY / UT transform). Any T (padded internally), any chunk size >= 1.

    Everything runs in the accumulation dtype (float32, or float64), autocast
    off: the triangular inverse is where low precision would hurt. The Python
    loop runs once per chunk and holds two small matrix products.
    """
    _check_shapes(q, k, v, log_g, beta, state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    B, H, T, dk = q.shape
    dv, out_dtype = v.size(-1), v.dtype
    S = _initial_state(q, v, state)
    acc = S.dtype
    if T == 0:
        return v.new_zeros(B, H, 0, dv), S
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    with torch.autocast(device_type=v.device.type, enabled=False):
        q, k, v, log_g, beta = (t.to(acc) for t in (q, k, v, log_g, beta))
        if pad:
            # Padded steps: no key, no value, beta 0, decay 1 - they leave the state as is.
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            log_g, beta = F.pad(log_g, (0, pad)), F.pad(beta, (0, pad))
        qc = q.view(B, H, n, C, dk)
        kc = k.view(B, H, n, C, dk)
        vc = v.view(B, H, n, C, dv)
        g = log_g.view(B, H, n, C)
        b = beta.view(B, H, n, C, 1)

        decay, G, S_in, U_all, S = _chunk_pass(kc, vc, g, b, S)
        scores = (qc @ kc.transpose(-1, -2)) * decay  # [B, H, n, C, C], lower triangular
        o = (qc * torch.exp(G)) @ S_in + scores @ U_all  # [B, H, n, C, dv]
    o = o.reshape(B, H, n * C, dv)[:, :, :T]
    return o.to(out_dtype), S
