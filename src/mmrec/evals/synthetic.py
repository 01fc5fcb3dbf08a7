"""Synthetic recall tasks: batch generators and the scorer.

Three tasks that isolate one ability each, small enough to train on a CPU:

* **MQAR** (multi-query associative recall, Zoology, Arora et al. 2023): a
  block of key-value pairs, then every key queried again; the model must
  output the value paired with each queried key. Recall of many associations
  is what separates attention from fixed-state models in that paper. Two
  layouts: Zoology's own (:func:`mqar_zoology_batch`) and this project's
  first one (:func:`mqar_batch`), kept so earlier results can be reproduced.
* **Induction heads** (Mamba paper, after Olsson et al.): a trigger token
  appears once followed by a target; at the end the trigger appears again and
  the model must output the target. Trained short and tested long, it shows
  whether recall generalises beyond the training length.
* **Selective copying** (Mamba paper): a few data tokens scattered among
  blanks, then a run of markers; the model must output the data tokens in
  order. It needs content-aware (selective) memory, not fixed-offset copying.

Every generator returns ``(inputs [B, T], targets [B, T])`` int64 tensors in
the layout of next-token training: ``targets[t]`` is what the model must
output after reading ``inputs[..t]``; positions that are not scored hold
``IGNORE`` (-100, the ignore index of the models' loss). Batches are a pure
function of the ``torch.Generator`` passed in, so a seed reproduces them.

Training, validation (choosing settings such as the learning rate) and
evaluation draw their batches from separate seed streams
(:func:`stream_seed`) that cannot collide, whatever the seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100
PAD_ID = 0

# A CPU torch.Generator keeps only the low 32 bits of its seed (manual_seed(s) and manual_seed(s + 2**32) give the
# same stream), so a seed offset such as seed + 1_000_003 can land on another run's training seed. The streams are
# kept apart inside those 32 bits instead: the top two name the role, the low 30 hold the run's seed.
SEED_LIMIT = 2**30
STREAMS = {"train": 0, "validation": 1, "evaluation": 2}


def stream_seed(seed: int, role: str) -> int:
    """The generator seed of stream ``role`` ("train", "validation" or "evaluation") of run ``seed``.

    ``train`` is the seed itself. For any two seeds in [0, SEED_LIMIT) the
    streams of different roles never share a generator seed (not even modulo
    2**32), so no evaluation batch is drawn from a stream that trained or chose
    a setting.
    """
    if role not in STREAMS:
        raise ValueError(f"role must be one of {sorted(STREAMS)}, got {role!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(
            f"seed must be an integer in [0, 2**30) = [0, {SEED_LIMIT}) so that its training, validation and "
            f"evaluation streams stay apart, got {seed!r}"
        )
    return (STREAMS[role] << 30) | seed


def stream_generator(seed: int, role: str) -> torch.Generator:
    """A CPU generator on stream ``role`` of run ``seed`` (:func:`stream_seed`)."""
    return torch.Generator().manual_seed(stream_seed(seed, role))


def _check_int(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) so batches are "
            f"reproducible, got {type(generator).__name__}"
        )
    return generator


def _random_subset(batch: int, population: int, k: int, generator: torch.Generator) -> Tensor:
    """k distinct indices in [0, population) per row, in random order: [batch, k]."""
    # The top-k of i.i.d. uniforms is a uniformly random k-subset in random order.
    return torch.rand(batch, population, generator=generator).topk(k, dim=1).indices


def _check_mqar(batch: int, seq_len: int, kv_pairs: int, vocab_size: int, power_a: float) -> None:
    _check_int("batch", batch, 1)
    _check_int("kv_pairs", kv_pairs, 1)
    _check_int("seq_len", seq_len, 1)
    _check_int("vocab_size", vocab_size, 1)
    if seq_len < 4 * kv_pairs:
        raise ValueError(
            f"seq_len {seq_len} is too short for {kv_pairs} kv_pairs: the pairs and their queries need "
            f"4 * kv_pairs = {4 * kv_pairs} tokens; raise seq_len or lower kv_pairs"
        )
    half = vocab_size // 2
    if half - 1 < kv_pairs:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for {kv_pairs} distinct keys: keys come from [1, vocab_size//2) "
            f"({max(half - 1, 0)} ids); use vocab_size >= {2 * (kv_pairs + 1)}"
        )
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0 (0.01: Zoology's default, 1: uniform), got {power_a!r}")


def _mqar_pairs(B: int, T: int, N: int, V: int, g: torch.Generator, power_a: float) -> tuple[Tensor, Tensor, Tensor]:
    """Keys [B, N] from [1, V/2), values [B, N] from [V/2, V), each distinct in its row, and the gaps [B, N].

    The gaps are N distinct pair-aligned slots of the query region, drawn as
    Zoology draws them (``np.random.choice(space, N, replace=False, p)`` with
    ``p(i) ~ (i+1)^(a-1)``): adding Gumbel noise to log p and taking the top N
    *in order* is exactly sequential sampling without replacement, so
    ``gaps[:, i]`` is distributed as Zoology's gap for the i-th key.
    """
    half = V // 2
    keys = _random_subset(B, half - 1, N, g) + 1  # [B, N] in [1, V/2)
    values = _random_subset(B, V - half, N, g) + half  # [B, N] in [V/2, V)
    slots = (T - 2 * N) // 2  # pair-aligned places in the query region, >= N
    log_p = (power_a - 1) * torch.log(torch.arange(1, slots + 1, dtype=torch.float64))
    u = torch.rand(B, slots, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gaps = (log_p - torch.log(-torch.log(u))).topk(N, dim=1).indices  # [B, N], in order of drawing
    return keys, values, gaps


def mqar_batch(
    batch: int,
    seq_len: int,
    kv_pairs: int,
    vocab_size: int,
    generator: torch.Generator,
    power_a: float = 0.01,
    random_filler: bool = False,
) -> tuple[Tensor, Tensor]:
    """MQAR in this project's first ("legacy") layout; :func:`mqar_zoology_batch` is Zoology's own.

    ``k1 v1 k2 v2 ... kN vN`` (keys distinct, from [1, V/2); values distinct,
    from [V/2, V)), then the query region: every key appears exactly once, in
    random order, each followed by its value, at pair-aligned slots whose
    distance from the start of the region follows Zoology's power law
    (``power_a`` 0.01: most queries come soon after the pairs; 1.0: uniform).
    Other positions are filler: ``PAD_ID`` (0), or random tokens with
    ``random_filler`` (Zoology's ``random_non_queries``). Unlike Zoology the
    value follows its query key in the input too, so the sequence reads as a
    language-model stream, and which key takes which slot is shuffled; only
    the prediction at the query key is scored: ``targets[t] = value`` where
    ``inputs[t]`` is a queried key.
    """
    _check_mqar(batch, seq_len, kv_pairs, vocab_size, power_a)
    g = _check_generator(generator)
    B, T, N = batch, seq_len, kv_pairs
    keys, values, chosen = _mqar_pairs(B, T, N, vocab_size, g, power_a)
    context = 2 * N
    # The top-k order favours early slots for the first keys; shuffle which key takes which slot
    # so the query order is independent of the order of the pairs.
    order = torch.rand(B, N, generator=g).argsort(dim=1)
    slot_of_key = chosen.gather(1, order)  # [B, N]

    if random_filler:
        inputs = torch.randint(0, vocab_size, (B, T), generator=g)
    else:
        inputs = torch.full((B, T), PAD_ID, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * slot_of_key  # [B, N]
    inputs.scatter_(1, query_pos, keys)
    inputs.scatter_(1, query_pos + 1, values)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


def mqar_zoology_batch(
    batch: int,
    seq_len: int,
    kv_pairs: int,
    vocab_size: int,
    generator: torch.Generator,
    power_a: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """MQAR in Zoology's own layout (HazyResearch/zoology, ``zoology/data/multiquery_ar.py``, ``multiquery_ar``).

    ``k1 v1 ... kN vN`` (keys distinct, from [1, V/2); values distinct, from
    [V/2, V)), then the query region of ``seq_len - 2N`` tokens: key ``i``
    appears once, at offset ``2 * gap_i`` from the region's start, the gaps
    distinct and drawn by Zoology's power law (``power_a`` 0.01: most queries
    soon after the pairs; 1: uniform). Every other position of the sequence,
    the one after each queried key included, holds a token drawn uniformly
    from [0, V), as Zoology's ``random_non_queries`` draws it (so a filler may
    by chance equal a key or a value). ``targets[t]`` is the value of the key
    at ``t`` where ``t`` holds a queried key, ``IGNORE`` everywhere else: the
    model must output the value right after reading the key, and the value is
    never shown again. As in Zoology, the i-th key of the context takes the
    i-th gap drawn, so earlier pairs tend to be queried first.
    """
    _check_mqar(batch, seq_len, kv_pairs, vocab_size, power_a)
    g = _check_generator(generator)
    B, T, N = batch, seq_len, kv_pairs
    keys, values, gaps = _mqar_pairs(B, T, N, vocab_size, g, power_a)
    context = 2 * N
    inputs = torch.randint(0, vocab_size, (B, T), generator=g)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps  # [B, N]
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets.scatter_(1, query_pos, values)
    return inputs, targets


# `mmrec synth mqar --layout`: Zoology's by default.
MQAR_LAYOUTS = {"zoology": mqar_zoology_batch, "legacy": mqar_batch}


def induction_batch(
    batch: int,
    seq_len: int,
    vocab_size: int,
    generator: torch.Generator,
    prefix_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of the induction-heads task (Mamba paper, section 4.1.2).

    Random tokens from [1, V-1); the trigger ``V-1`` appears once at a random
    position p < ``prefix_len`` - 1, followed by the target token; the last
    token is the trigger again and the model must output the target there
    (``targets[:, -1]``; every other target is ignored). ``prefix_len``
    (default: the whole sequence) bounds where the first trigger may fall,
    i.e. how far back the recall reaches.
    """
    _check_int("batch", batch, 1)
    _check_int("seq_len", seq_len, 3)
    _check_int("vocab_size", vocab_size, 3)
    g = _check_generator(generator)
    # The first trigger and its target must fit before the final trigger at T-1.
    limit = seq_len - 2 if prefix_len is None else _check_int("prefix_len", prefix_len, 2) - 1
    if limit > seq_len - 2:
        raise ValueError(f"prefix_len {prefix_len} must be <= seq_len - 1 = {seq_len - 1}")
    B, T, trigger = batch, seq_len, vocab_size - 1
    inputs = torch.randint(1, trigger, (B, T), generator=g)  # tokens in [1, V-1): never the trigger
    pos = torch.randint(0, limit, (B, 1), generator=g)
    target_tokens = inputs.gather(1, pos + 1)  # [B, 1]: whatever random token follows the trigger
    inputs.scatter_(1, pos, trigger)
    inputs[:, -1] = trigger
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[:, -1] = target_tokens[:, 0]
    return inputs, targets


def selective_copy_batch(
    batch: int,
    seq_len: int,
    n_tokens: int,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """A batch of selective copying (Mamba paper, section 4.1.1).

    The first ``seq_len - n_tokens`` positions are blanks (``PAD_ID``) with
    ``n_tokens`` data tokens from [1, V-1) at random positions; the last
    ``n_tokens`` positions are the marker ``V-1``. At the i-th marker the
    model must output the i-th data token (in order of appearance); only
    those positions are scored.
    """
    _check_int("batch", batch, 1)
    _check_int("n_tokens", n_tokens, 1)
    _check_int("vocab_size", vocab_size, 3)
    _check_int("seq_len", seq_len, 1)
    g = _check_generator(generator)
    if seq_len < 2 * n_tokens:
        raise ValueError(
            f"seq_len {seq_len} is too short for {n_tokens} n_tokens: the data tokens and as many markers "
            f"need seq_len >= 2 * n_tokens = {2 * n_tokens}"
        )
    B, T, marker = batch, seq_len, vocab_size - 1
    context = T - n_tokens
    positions = _random_subset(B, context, n_tokens, g).sort(dim=1).values  # [B, n] ascending
    data = torch.randint(1, marker, (B, n_tokens), generator=g)
    inputs = torch.full((B, T), PAD_ID, dtype=torch.long)
    inputs.scatter_(1, positions, data)
    inputs[:, context:] = marker
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    targets[:, context:] = data
    return inputs, targets


def score(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, total): argmax accuracy counted where ``targets != IGNORE``.

    Only the scored rows of ``logits`` [B, T, V] are reduced, so scoring a
    window with a large vocabulary costs little beyond the forward itself.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: logits must be "
            "[..., vocab] over the targets' shape"
        )
    mask = targets != IGNORE
    total = int(mask.sum())
    if total == 0:
        return 0, 0
    correct = int((logits[mask].argmax(dim=-1) == targets[mask]).sum())
    return correct, total
