"""Language models: MM-Rec and the Transformer baselines, with one call signature; built and loaded here."""

from mmrec.models.checkpoint import CheckpointError, LoadedModel, load
from mmrec.models.factory import build_model
from mmrec.models.mmrec import MMRecBlock, MMRecLM
from mmrec.models.output import LMOutput
from mmrec.models.state import KVCache, MMRecState, StateError
from mmrec.models.transformer import TransformerLM, matched_transformer_config

__all__ = [
    "CheckpointError",
    "KVCache",
    "LMOutput",
    "LoadedModel",
    "MMRecBlock",
    "MMRecLM",
    "MMRecState",
    "StateError",
    "TransformerLM",
    "build_model",
    "load",
    "matched_transformer_config",
]
