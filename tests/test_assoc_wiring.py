"""A state saved by an older mmrec, whose stored config lacks fields added since, loads into a model that
leaves those fields at their defaults."""

from __future__ import annotations

import pytest

from mmrec import MMRecConfig, MMRecLM
from mmrec.config import TransformerConfig
from mmrec.models.state import MMRecState, StateError, config_differences

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
SLOT_FIELDS = ["memory", "summaries", "sequence", "pending"]


def test_a_state_saved_before_a_config_field_existed_loads(tmp_path):
    """A state whose stored config lacks a field (written by an mmrec before the field was added) counts it
    at its default."""
    model = MMRecLM(MMRecConfig(**BASE))
    state = model.init_state(1)
    old = model.config.to_dict()
    del old["short_term"], old["selective_write"]  # as an mmrec before both fields wrote it
    state.save(tmp_path / "old.safetensors", config=old)
    loaded = MMRecState.load(tmp_path / "old.safetensors", config=model.config.to_dict())
    assert loaded.position == 0 and set(loaded.tensors()) == {"short", "conv", *SLOT_FIELDS}
    # A field the model sets away from its default still differs.
    delta = MMRecLM(MMRecConfig(**BASE, short_term="delta"))
    with pytest.raises(StateError, match=r"differs in: short_term\)"):
        MMRecState.load(tmp_path / "old.safetensors", config=delta.config.to_dict())
    # Derived defaults resolve as the config resolves them (d_mem from d_model).
    no_dmem = {k: v for k, v in old.items() if k != "d_mem"}
    assert config_differences(no_dmem, model.config.to_dict()) == []
    assert config_differences(no_dmem, MMRecLM(MMRecConfig(**BASE, d_mem=64)).config.to_dict()) == ["d_mem"]
    # A stored field the model does not know, or a changed value, still differs.
    assert config_differences({**old, "newer": 1}, model.config.to_dict()) == ["newer"]
    assert config_differences({**old, "d_model": 64}, model.config.to_dict()) == ["d_model"]
    tf = TransformerConfig(d_model=32, n_heads=2).to_dict()
    assert config_differences({k: v for k, v in tf.items() if k != "rope_theta"}, tf) == []
