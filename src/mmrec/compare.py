"""``mmrec compare``: the founding document's comparison table, measured.

Trains MM-Rec and GPT-, LLaMA- and Mistral-style Transformers at matched
parameter counts on the same data, token budget, curriculum and seed; tracks
the five learning stages in every run; measures bits per byte by position,
training throughput and memory against length, decoding latency and state
bytes against context; then writes ``report.md`` and figures to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmrec.config import ConfigError, ModelConfig, TransformerConfig
from mmrec.data.cache import source_specs
from mmrec.train.config import TrainConfig
from mmrec.utils.device import autocast_for, resolve_device

MODELS: tuple[tuple[str, str, str], ...] = (
    # (key, arch, preset)
    ("mmrec", "mmrec", "llama"),
    ("gpt", "transformer", "gpt"),
    ("llama", "transformer", "llama"),
    ("mistral", "transformer", "mistral"),
)
LABELS = {"mmrec": "MM-Rec", "gpt": "GPT-style", "llama": "LLaMA-style", "mistral": "Mistral-style"}


@dataclass
class Preset:
    """A comparison budget: model size, training schedule and measurement grid."""

    train: dict[str, Any]
    mistral_window: int
    speed_lengths: list[int]
    speed_tokens: int
    decode_contexts: list[int]
    bpb_docs: int
    bpb_max_tokens: int
    isolate_memory: bool  # measure CPU peak memory in child processes (slower)
    description: str = ""
    speed_steps: int = 2
    decode_steps: int = 10


PRESETS: dict[str, Preset] = {
    "micro": Preset(
        train=dict(
            d_model=64,
            n_layers=2,
            n_heads=2,
            chunk_size=16,
            mem_slots=8,
            summary_window=4,
            seq_len=128,
            batch_size=8,
            max_steps=60,
            eval_every=20,
            checkpoint_every=60,
            eval_tokens=4096,
            lr=3e-3,
            warmup_steps=10,
            log_every=20,
            sample_tokens=0,
            seq_len_schedule="0:64,16K:128",
        ),
        mistral_window=64,
        speed_lengths=[128, 256, 512, 1024],
        speed_tokens=2048,
        decode_contexts=[256, 1024],
        bpb_docs=3,
        bpb_max_tokens=3000,
        isolate_memory=False,
        speed_steps=1,
        decode_steps=5,
        description="a few minutes on 2 CPU cores; for tests and smoke checks",
    ),
    "small": Preset(
        train=dict(
            d_model=256,
            n_layers=4,
            n_heads=4,
            chunk_size=64,
            mem_slots=32,
            summary_window=8,
            seq_len=512,
            batch_size=8,
            max_steps=450,
            eval_every=50,
            checkpoint_every=150,
            eval_tokens=32768,
            lr=2e-3,
            warmup_steps=40,
            log_every=25,
            sample_tokens=200,
            seq_len_schedule="0:256,500K:512,1M:1024",
        ),
        mistral_window=256,
        speed_lengths=[512, 1024, 2048, 4096, 8192],
        speed_tokens=8192,
        decode_contexts=[1024, 8192, 32768],
        bpb_docs=6,
        bpb_max_tokens=40000,
        isolate_memory=True,
        description="about 30 minutes of training on 2 CPU cores (5M-parameter models)",
    ),
    "gpu": Preset(
        train=dict(
            d_model=512,
            n_layers=8,
            n_heads=8,
            chunk_size=64,
            mem_slots=64,
            summary_window=16,
            seq_len=2048,
            batch_size=32,
            max_steps=3000,
            eval_every=250,
            checkpoint_every=1000,
            eval_tokens=262144,
            lr=1.5e-3,
            warmup_steps=200,
            log_every=50,
            sample_tokens=400,
            seq_len_schedule="0:512,20M:2048,60M:8192",
        ),
        mistral_window=2048,
        speed_lengths=[2048, 8192, 32768, 65536],
        speed_tokens=65536,
        decode_contexts=[1024, 32768, 131072],
        bpb_docs=16,
        bpb_max_tokens=200000,
        isolate_memory=False,
        speed_steps=5,
        decode_steps=30,
        description="one GPU, ~30M-parameter models, up to 8K-token windows",
    ),
}


@dataclass
class CompareOptions:
    out: str
    preset: str = "micro"
    data: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"
    models: list[str] = field(default_factory=lambda: [m[0] for m in MODELS])
    data_cache: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


def model_configs(opts: CompareOptions) -> dict[str, TrainConfig]:
    if opts.preset not in PRESETS:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got {opts.preset!r}")
    unknown = [m for m in opts.models if m not in LABELS]
    if unknown:
        raise ConfigError(f"models: unknown {', '.join(unknown)}; choose from {', '.join(LABELS)}")
    preset = PRESETS[opts.preset]
    out = Path(opts.out)
    configs = {}
    for key, arch, style in MODELS:
        if key not in opts.models:
            continue
        values: dict[str, Any] = {
            **preset.train,
            **opts.overrides,
            "data": list(opts.data),
            "out": str(out / key),
            "arch": arch,
            "seed": opts.seed,
            "device": opts.device,
            "data_cache": opts.data_cache,
            "match_params": True,
        }
        if arch == "transformer":
            values["preset"] = style
            if style == "mistral":
                values["window"] = preset.mistral_window
        try:
            configs[key] = TrainConfig.from_flat(values)
        except ValueError as e:  # ConfigError, or a shape whose parameters cannot be matched
            raise ConfigError(f"{LABELS[key]}: cannot build the model for training: {e}") from e
    return configs


def _train_all(configs: dict[str, TrainConfig], log: Any) -> dict[str, dict[str, Any]]:
    from mmrec.models.checkpoint import list_checkpoints
    from mmrec.train.trainer import Trainer

    summaries = {}
    for key, cfg in configs.items():
        run = Path(cfg.out or "")
        done = run / "summary.json"
        if done.is_file() and list_checkpoints(run):
            log(f"[{LABELS[key]}] already trained in {run}; reusing it")
            if stage3_measured_cold(run, cfg):
                log(
                    f"[{LABELS[key]}] its stages.json measured stage 3 from a fresh state (before every model "
                    "started each window from the same condition, issue 13); the report shows it as measured. "
                    f"`mmrec stages {run}` measures its kept checkpoints again."
                )
            summaries[key] = json.loads(done.read_text())
            continue
        if list_checkpoints(run):
            cfg = dataclasses.replace(cfg, resume="auto")
        log(f"[{LABELS[key]}] training -> {run}")
        summaries[key] = Trainer(cfg).fit()
    return summaries


def stage3_measured_cold(run: Path, cfg: TrainConfig) -> bool:
    """Whether a carried-state run's stages.json holds stage-3 numbers measured before windows started warm
    (its history rows lack ``context_warmup_tokens``): a reused run's report would show the old measurement."""
    path = run / "stages.json"
    if cfg.arch != "mmrec" or not path.is_file():
        return False
    try:
        history = json.loads(path.read_text()).get("history") or []
    except (OSError, ValueError):
        return False
    return any("context_warmup_tokens" not in row for row in history)


def _measure_speed(
    configs: dict[str, TrainConfig], preset: Preset, device: torch.device, log: Any
) -> dict[str, dict[str, Any]]:
    from mmrec.evals.speed import decode_latency, fit_exponents, measure_isolated, train_throughput
    from mmrec.models import TransformerLM

    dtype = torch.bfloat16 if device.type == "cuda" else None
    results: dict[str, dict[str, Any]] = {}
    for key, cfg in configs.items():
        build = _Builder(_speed_config(cfg, preset))
        vocab = build.cfg.vocab_size
        rows: list[dict[str, Any]] = []
        for T in preset.speed_lengths:
            kwargs = dict(seq_len=T, tokens=max(preset.speed_tokens, T), steps=preset.speed_steps, vocab=vocab)
            r: dict[str, Any]
            try:
                if preset.isolate_memory and device.type == "cpu":
                    r = measure_isolated(train_throughput, build, device=device, dtype=dtype, **kwargs)
                else:
                    r = train_throughput(build().to(device), device=device, dtype=dtype, **kwargs)
                    r["peak_rss_gib"] = float("nan")
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                r = {"error": str(e)[:200]}
            rows.append({"seq_len": T, **r})
            done = f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else str(r["error"])
            log(f"[{LABELS[key]}] train speed at T={T}: {done}")
        model = build().to(device).eval()
        decode = []
        for ctx in preset.decode_contexts:
            if (
                isinstance(model, TransformerLM)
                and model.pos_embed is not None
                and ctx >= model.pos_embed.num_embeddings
            ):
                decode.append({"context": ctx, "skipped": f"learned positions end at {model.pos_embed.num_embeddings}"})
                continue
            d = decode_latency(model, ctx, preset.decode_steps, device, dtype, vocab=vocab)
            decode.append({"context": ctx, **d})
            log(
                f"[{LABELS[key]}] decode after {ctx:,} tokens: {d['ms_per_token']:.2f} ms/token, "
                f"state {d['state_bytes'] / 2**20:.2f} MiB"
            )
        results[key] = {"train": rows, "decode": decode, "state_bytes_32k": _state_bytes_at(model, 32768)}
    # Seconds per sequence at every length that ran; the exponents are fitted over the lengths all models ran.
    seconds = {
        key: {int(r["seq_len"]): r["seconds_per_step"] / r["batch"] for r in res["train"] if "seconds_per_step" in r}
        for key, res in results.items()
    }
    for key, fit in fit_exponents(seconds).items():
        results[key].update(fit)
    return results


def _speed_config(cfg: TrainConfig, preset: Preset) -> ModelConfig:
    """The trained model's config with room in gpt's position table for the longest measurement (rows that
    are never trained cost no compute)."""
    model = cfg.model
    assert model is not None
    longest = max(preset.speed_lengths + preset.decode_contexts) + preset.decode_steps + 8
    if isinstance(model, TransformerConfig) and model.preset == "gpt" and (model.max_seq_len or 0) < longest:
        return dataclasses.replace(model, max_seq_len=longest)
    return model


def check_buildable(configs: dict[str, TrainConfig], preset: Preset) -> None:
    """Build every model as training and the speed measurements will, on the meta device (no
    memory, no time), so that a shape that cannot work fails before the models train."""
    from mmrec.models import build_model

    for key, cfg in configs.items():
        for what, c in (("training", cfg.model), ("the speed measurements", _speed_config(cfg, preset))):
            try:
                with torch.device("meta"):
                    build_model(c)  # type: ignore[arg-type]
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"{LABELS[key]}: cannot build the model for {what}: {e}") from e


@dataclass
class _Builder:
    """A picklable model factory (child processes rebuild the model from the config)."""

    cfg: ModelConfig

    def __call__(self) -> torch.nn.Module:
        from mmrec.models import build_model

        torch.manual_seed(0)
        return build_model(self.cfg)


def _state_bytes_at(model: torch.nn.Module, context: int) -> dict[str, Any]:
    """Bytes a model carries at ``context`` tokens: MM-Rec's state (measured: it does not grow), or the KV cache."""
    from mmrec.models import MMRecLM

    if isinstance(model, MMRecLM):
        return {"bytes": model.init_state(1).nbytes(), "how": "measured (MMRecState.nbytes, constant)"}
    c: Any = model.config
    kept = min(context, c.window - 1) if c.window else context
    element = next(model.parameters()).element_size()
    return {
        "bytes": 2 * c.n_layers * c.d_model * kept * element,
        "how": f"KV cache: 2 x {c.n_layers} layers x {c.d_model} x {kept:,} tokens x {element} bytes",
    }


def _bpb_by_position(
    configs: dict[str, TrainConfig], preset: Preset, device: torch.device, log: Any
) -> dict[str, dict[str, Any]]:
    """Bits per byte by position on the longest validation documents, for every model."""
    from mmrec.data.cache import cached_dataset, source_specs
    from mmrec.evals.bpb import evaluate_bpb
    from mmrec.evals.common import load_checkpoint

    results = {}
    docs: list[list[int]] | None = None
    for key, cfg in configs.items():
        lm = load_checkpoint(cfg.out or "", device)
        if docs is None:
            dataset = cached_dataset(
                source_specs(cfg.data, cfg.text_field),
                lm.tokenizer,
                cfg.val_fraction,
                cfg.data_cache,
                log=lambda _: None,
            )
            pool = [src.val.doc(i) for src in dataset.sources.values() for i in range(src.val.n_docs)]
            pool.sort(key=len, reverse=True)
            docs = [d[: preset.bpb_max_tokens].tolist() for d in pool[: preset.bpb_docs]]
        autocast = autocast_for(device)
        cut = min(2048, max(64, lm.trained_seq_len))
        results[key] = evaluate_bpb(
            lm.model, docs, lm.tokenizer.token_bytes(), lm.trained_seq_len, cut=cut, device=device, autocast=autocast
        )
        log(
            f"[{LABELS[key]}] bits per byte by position: "
            + ", ".join(
                f"{b} {v:.3f}"
                for b, v in zip(results[key]["buckets"], results[key]["full_bpb"], strict=True)
                if v is not None
            )
        )
    return results


def run_compare(opts: CompareOptions, log: Any = print) -> Path:
    """Train, measure and report; returns the path of report.md."""
    from mmrec.report import write_report

    configs = model_configs(opts)
    preset = PRESETS[opts.preset]
    device = resolve_device(opts.device)
    check_buildable(configs, preset)
    # The data is checked before anything is created: a missing path fails here, with no output folder made.
    source_specs(opts.data, "text")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries = _train_all(configs, log)
    train_seconds = time.perf_counter() - t0
    bpb = _bpb_by_position(configs, preset, device, log)
    speed = _measure_speed(configs, preset, device, log)
    results = {
        "preset": opts.preset,
        "preset_description": preset.description,
        "data": opts.data or ["builtin"],
        "seed": opts.seed,
        "device": str(device),
        "train_seconds": train_seconds,
        "models": {
            key: {
                "config": cfg.to_dict(),
                "summary": summaries[key],
                "bpb_by_position": bpb[key],
                "speed": speed[key],
                "run": cfg.out,
            }
            for key, cfg in configs.items()
        },
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    return write_report(out, results)


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
