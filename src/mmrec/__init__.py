"""mmrec: MM-Rec, a long-context language model with a dual memory, and the tools around it."""

from mmrec.config import ConfigError, MMRecConfig, TransformerConfig
from mmrec.models import (
    KVCache,
    LMOutput,
    MMRecLM,
    MMRecState,
    StateError,
    TransformerLM,
    matched_transformer_config,
)
from mmrec.tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "ByteTokenizer",
    "ConfigError",
    "KVCache",
    "LMOutput",
    "MMRecConfig",
    "MMRecLM",
    "MMRecState",
    "StateError",
    "TransformerConfig",
    "TransformerLM",
    "__version__",
    "matched_transformer_config",
]
