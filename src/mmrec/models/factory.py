"""Models from their configs: the one place where an architecture name becomes a module.

Every command that builds a model (``train``, ``synth``, ``compare``) and every
loader goes through :func:`build_model`, and every command-line model option
is a field of :class:`~mmrec.config.MMRecConfig` or
:class:`~mmrec.config.TransformerConfig`: :func:`resolve_model_config` turns
the option values a user gave into the config of the chosen architecture.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import torch

from mmrec.config import ConfigError, MMRecConfig, ModelConfig, TransformerConfig
from mmrec.models.mmrec import MMRecLM
from mmrec.models.transformer import TransformerLM, matched_transformer_config

ARCHS = ("mmrec", "transformer")
MMREC_FIELDS = tuple(f.name for f in dataclasses.fields(MMRecConfig))
TRANSFORMER_FIELDS = tuple(f.name for f in dataclasses.fields(TransformerConfig))
SHARED_FIELDS = tuple(n for n in MMREC_FIELDS if n in TRANSFORMER_FIELDS)
MODEL_FIELDS = tuple(dict.fromkeys(MMREC_FIELDS + TRANSFORMER_FIELDS))
# The type of every model option (for converting config-file values); shared names have one type in both.
MODEL_HINTS: dict[str, Any] = {**typing.get_type_hints(TransformerConfig), **typing.get_type_hints(MMRecConfig)}


def arch_of(config: ModelConfig) -> str:
    return "mmrec" if isinstance(config, MMRecConfig) else "transformer"


def config_class(arch: str) -> type[MMRecConfig] | type[TransformerConfig]:
    if arch == "mmrec":
        return MMRecConfig
    if arch == "transformer":
        return TransformerConfig
    raise ConfigError(f"arch: must be one of {', '.join(ARCHS)}, got {arch!r}")


def model_config_from_dict(arch: str, data: dict[str, Any]) -> ModelConfig:
    return config_class(arch).from_dict(data)


def build_model(config: ModelConfig) -> MMRecLM | TransformerLM:
    """The model of a config, freshly initialised."""
    if isinstance(config, MMRecConfig):
        return MMRecLM(config)
    if isinstance(config, TransformerConfig):
        return TransformerLM(config)
    raise TypeError(f"not a model config: {config!r}")


def label(config: ModelConfig) -> str:
    """'mmrec' or 'transformer-PRESET': how results name a model."""
    return "mmrec" if isinstance(config, MMRecConfig) else f"transformer-{config.preset}"


def resolve_model_config(
    arch: str,
    values: dict[str, Any],
    *,
    vocab_size: int,
    match_params: bool = True,
    train_len: int | None = None,
    eval_len: int | None = None,
    window_default: int | None = None,
) -> ModelConfig:
    """The config of ``arch`` from the model options a user gave (``values``: fields of either config).

    A Transformer with ``match_params`` gets the MLP width ``d_ff`` at which its
    parameter count equals that of the MM-Rec built from the same values (the
    MM-Rec-only options, such as ``mem_slots``, describe that MM-Rec). The GPT
    preset's learned position table is as long as ``train_len`` unless given,
    and grows to ``eval_len`` after matching (rows that are never trained must
    not shrink the MLP). ``window_default`` is the Mistral window when none is given.
    """
    unknown = sorted(set(values) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(unknown)}")
    values = {**values, "vocab_size": vocab_size}
    if arch == "mmrec":
        foreign = sorted(k for k in values if k not in MMREC_FIELDS and values[k] is not None)
        if foreign:
            raise ConfigError(f"{', '.join(foreign)}: only for --arch transformer (this model is mmrec)")
        return MMRecConfig(**values)
    if arch != "transformer":
        config_class(arch)  # raises with the allowed names
    mmrec_only = sorted(k for k in values if k not in TRANSFORMER_FIELDS)
    if mmrec_only and not match_params:
        raise ConfigError(
            f"{', '.join(mmrec_only)}: MM-Rec options; with --arch transformer they only describe the MM-Rec "
            "whose parameter count the baseline matches (drop --no-match-params, or drop them)"
        )
    kwargs = {k: v for k, v in values.items() if k in TRANSFORMER_FIELDS}
    if kwargs.get("preset", "llama") == "gpt" and kwargs.get("max_seq_len") is None and train_len:
        kwargs["max_seq_len"] = train_len
    if kwargs.get("preset") == "mistral" and kwargs.get("window") is None and window_default:
        kwargs["window"] = window_default
    if not match_params:
        return TransformerConfig(**kwargs)
    if kwargs.get("d_ff") is not None:
        raise ConfigError("d_ff: a matched baseline chooses its MLP width itself; add --no-match-params to set it")
    reference = MMRecConfig(**{k: v for k, v in values.items() if k in MMREC_FIELDS})
    with torch.device("meta"):
        target = MMRecLM(reference).num_parameters()
    config = matched_transformer_config(target, **kwargs)
    if config.preset == "gpt" and (eval_len or 0) > (config.max_seq_len or 0):
        config = dataclasses.replace(config, max_seq_len=eval_len)
    return config
