"""Language models: MM-Rec and the Transformer baselines, with one call signature."""

from mmrec.models.mmrec import MMRecBlock, MMRecLM
from mmrec.models.output import LMOutput
from mmrec.models.state import KVCache, MMRecState, StateError
from mmrec.models.transformer import TransformerLM, matched_transformer_config

__all__ = [
    "KVCache",
    "LMOutput",
    "MMRecBlock",
    "MMRecLM",
    "MMRecState",
    "StateError",
    "TransformerLM",
    "matched_transformer_config",
]
