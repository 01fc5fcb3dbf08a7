"""mmrec: MM-Rec, a long-context language model with a dual memory, and the tools around it."""

from mmrec.config import ConfigError, MMRecConfig, TransformerConfig
from mmrec.hf import register_on_import as _register_with_transformers
from mmrec.models import (
    CheckpointError,
    KVCache,
    LMOutput,
    LoadedModel,
    MMRecLM,
    MMRecState,
    StateError,
    TransformerLM,
    build_model,
    load,
    matched_transformer_config,
)
from mmrec.tokenizer import ByteTokenizer
from mmrec.version import __version__

# AutoConfig / AutoModelForCausalLM learn model_type "mmrec" when transformers is (or gets) imported.
_register_with_transformers()

__all__ = [
    "ByteTokenizer",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "LMOutput",
    "LoadedModel",
    "MMRecConfig",
    "MMRecLM",
    "MMRecState",
    "StateError",
    "TransformerConfig",
    "TransformerLM",
    "__version__",
    "build_model",
    "load",
    "matched_transformer_config",
]
