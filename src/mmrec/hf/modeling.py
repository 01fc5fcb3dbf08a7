"""MM-Rec as a transformers model: ``MMRecHFConfig``, ``MMRecCache`` and ``MMRecForCausalLM``.

``MMRecForCausalLM`` wraps :class:`mmrec.models.MMRecLM` (the same modules and weights under ``model.``,
no second implementation). The recurrent state travels through ``generate`` as the model's cache, the way
transformers' own recurrent models carry theirs: :class:`MMRecCache` is a ``transformers.Cache`` holding one
:class:`mmrec.models.MMRecState`, so decoding a token costs the same after ten tokens as after a million,
and ``generate(full_text, cache=returned_cache)`` continues where the last call stopped.

Importing this module needs transformers; ``mmrec.hf`` imports it only when transformers is there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from mmrec.config import MMRecConfig
from mmrec.models.mmrec import MMRecLM
from mmrec.models.state import MMRecState

MODEL_TYPE = "mmrec"
# generate hands the cache to the model as ``cache`` from 5.24 on (``past_key_values`` before, 5.20 included);
# with an older version the state would silently not be carried between steps.
MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"mmrec's Hugging Face model needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}: "
        "pip install 'mmrec[hf]'"
    )
_MMREC_FIELDS = tuple(f.name for f in dataclasses.fields(MMRecConfig))


class MMRecHFConfig(PretrainedConfig):
    """The fields of :class:`mmrec.MMRecConfig` as a transformers config (``model_type="mmrec"``).

    ``MMRecHFConfig.from_mmrec(cfg)`` and ``config.to_mmrec()`` convert; invalid values fail here, with
    MMRecConfig's message naming the field.
    """

    model_type = MODEL_TYPE
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads"}

    def __init__(self, use_cache: bool = True, tie_word_embeddings: bool = True, **kwargs: Any) -> None:
        values = {name: kwargs.pop(name) for name in _MMREC_FIELDS if name in kwargs}
        resolved = MMRecConfig(**values).to_dict()  # validates; fills the derived defaults (d_ff, d_mem, ...)
        for name, value in resolved.items():
            setattr(self, name, value)
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        # Token ids: transformers 5 keeps them on the model's config class, not on the base.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(self, name, kwargs.pop(name, None))
        super().__init__(**kwargs)

    @classmethod
    def from_mmrec(cls, config: MMRecConfig, **kwargs: Any) -> MMRecHFConfig:
        return cls(**config.to_dict(), **kwargs)

    def to_mmrec(self) -> MMRecConfig:
        return MMRecConfig(**{name: getattr(self, name) for name in _MMREC_FIELDS})


class MMRecCache(Cache):
    """MM-Rec's recurrent state as a transformers cache: the same size after any number of tokens.

    ``state`` is the :class:`~mmrec.models.MMRecState` after every token fed so far (None before the first
    call); it can be saved with ``cache.state.save(path)`` and continued by ``mmrec generate --state-in``.
    The model updates the cache in place, as transformers' caches are. It reports the tokens consumed as
    its sequence length, so ``generate(all_ids, cache=cache)`` feeds only the ids it has not seen. After
    ``generate`` it holds every token but the last one generated (transformers feeds a token only when it
    needs the logits that follow it); the next ``generate`` feeds that one first.
    """

    def __init__(self, state: MMRecState | None = None) -> None:
        super().__init__(layers=[])
        self.state = state

    def __repr__(self) -> str:
        where = "empty" if self.state is None else f"position {self.state.position}, {self.state.nbytes():,} bytes"
        return f"MMRecCache({where})"

    # What generate asks of a cache ----------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.state is None:
            return 0
        positions = set(self.state.positions)
        if len(positions) > 1:  # MMRecState.cat of streams at different positions (mmrec serve's batches)
            raise ValueError(
                f"this cache holds streams at different positions {self.state.position}; transformers needs "
                "one sequence length for the batch: decode them with mmrec (MMRecLM), or one cache per position"
            )
        return positions.pop()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: the state does not grow

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot give back the tokens it has absorbed

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # False on purpose: generate then trims the ids it is given by get_seq_length, as for a KV cache, so a
        # caller passes the whole text when continuing (an all-linear cache would be fed the whole text again).
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    def reset(self) -> None:
        self.state = None

    def _select(self, fn: Any) -> None:
        if self.state is not None:
            self.state = dataclasses.replace(self.state, **{k: fn(v) for k, v in self.state.tensors().items()})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the streams ``beam_idx`` (beam search); tensors hold streams on axis 1."""
        self._select(lambda t: t.index_select(1, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(lambda t: t.index_select(1, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=1))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("MMRecCache cannot be cropped: a recurrent state cannot forget chosen tokens")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("MMRecCache keeps no past to roll back to (assisted generation needs one)")

    def update(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("MMRecCache holds a recurrent state, not keys and values")


@dataclass
class MMRecCausalLMOutput(ModelOutput):
    """What ``MMRecForCausalLM.forward`` returns; ``cache`` has consumed every input token."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: MMRecCache | None = None


def _check_attention_mask(mask: Tensor) -> None:
    """A recurrent state absorbs every token it is fed, so only padding after the text is harmless."""
    m = mask.bool()
    if not bool(m.all()) and bool((~m[:, :-1] & m[:, 1:]).any()):
        raise ValueError(
            "MM-Rec cannot mask tokens out of its recurrent state: attention_mask has padding before text "
            "(left padding). Give the prompts of a batch the same length, or generate them one at a time."
        )


class MMRecForCausalLM(PreTrainedModel, GenerationMixin):
    """:class:`mmrec.MMRecLM` behind the transformers API: ``from_pretrained``, ``generate``, ``save_pretrained``.

    ``model`` is the MMRecLM itself; its weights are saved under ``model.`` in ``model.safetensors``.
    """

    config_class = MMRecHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MMRecBlock"]
    _is_stateful = True  # no assisted generation: a state cannot be rolled back
    supports_gradient_checkpointing = False

    def __init__(self, config: MMRecHFConfig) -> None:
        super().__init__(config)
        self.model = MMRecLM(config.to_mmrec())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # MM-Rec's own initialisation (decay spreads, memory slots, ...), not transformers' generic one.
        if isinstance(module, MMRecLM):
            module.reset_parameters()

    @classmethod
    def from_mmrec(cls, model: MMRecLM, **config_kwargs: Any) -> MMRecForCausalLM:
        """The same weights (copied) behind the transformers API."""
        hf = cls(MMRecHFConfig.from_mmrec(model.config, **config_kwargs))
        hf.model.load_state_dict(model.state_dict())
        hf.model.to(model.device)  # every weight lives in the wrapped MMRecLM
        return hf.eval()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader, then every CPU weight in memory of its own.

        The loader leaves CPU weights inside the memory-mapped file, at whatever offset safetensors put them;
        CPU BLAS rounds differently on unaligned data (logits moved by 1.2e-7 in float32). Own copies make the
        loaded model compute exactly what the saved one did, and free the file."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type == "cpu" and p.data_ptr() % 64:
                    p.data = p.data.clone()
        return model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a key/value cache; forward makes an MMRecCache

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """What forward needs at each step: the ids not yet in the cache, the cache, and the mask of a prompt.

        transformers' generic version also builds position ids, masks for compiled caches and multimodal
        inputs, at every step; MM-Rec uses none of them. ``past_key_values`` is the older name of ``cache``.
        """
        if inputs_embeds is not None:
            raise ValueError("MMRecForCausalLM takes input_ids, not inputs_embeds")
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        if cache is None:
            cache = kwargs.get("past_key_values")
        return {
            "input_ids": input_ids,
            "cache": cache,
            "attention_mask": attention_mask if input_ids.size(1) > 1 else None,
            "use_cache": kwargs.get("use_cache"),
            "logits_to_keep": kwargs.get("logits_to_keep") or 0,
        }

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value  # type: ignore[assignment]

    def get_output_embeddings(self) -> None:
        return None  # the head is the embedding matrix itself (MMRecLM.lm_head), nothing to tie

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        inputs_embeds: Tensor | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> MMRecCausalLMOutput | tuple[Any, ...]:
        """Logits of ``input_ids`` [B, T] continuing ``cache`` (or fresh streams); the cache is updated in place.

        ``labels`` are shifted inside (as in every transformers causal LM); ``logits_to_keep`` > 0 computes
        the head for the last positions only. ``past_key_values`` is the older name of ``cache``.
        """
        if inputs_embeds is not None:
            raise ValueError("MMRecForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("MMRecForCausalLM needs input_ids of shape [batch, time]")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if attention_mask is not None and input_ids.size(1) > 1:  # decoding steps only add ones to the mask
            _check_attention_mask(attention_mask)
        if cache is not None and not isinstance(cache, MMRecCache):
            if cache.get_seq_length() != 0:
                raise TypeError(f"MMRecForCausalLM continues an MMRecCache, not a {type(cache).__name__}")
            cache = None  # an empty cache made by generic code: replace it with ours
        if cache is None and use_cache:
            cache = MMRecCache()
        hidden, state = self.model.hidden_states(input_ids, None if cache is None else cache.state)
        if cache is not None:
            cache.state = state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.model.lm_head(hidden)  # [B, T or kept, V]
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), shifted.reshape(-1))
        out = MMRecCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None)
        if return_dict is False:
            return out.to_tuple()
        return out
