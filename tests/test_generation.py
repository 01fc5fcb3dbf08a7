import pytest
import torch

from mmrec import MMRecConfig, MMRecLM, TransformerConfig, TransformerLM
from mmrec.models.generation import sample_next


def models():
    yield MMRecLM(
        MMRecConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, chunk_size=8, mem_slots=4, summary_window=2)
    ).eval()
    yield TransformerLM(TransformerConfig(preset="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=2)).eval()


@pytest.mark.parametrize("model", list(models()), ids=["mmrec", "llama"])
def test_greedy_generation_matches_argmax_of_full_forward(model):
    prompt = torch.randint(0, 64, (2, 11))
    ids = model.generate(prompt, max_new_tokens=15, temperature=0.0)
    assert ids.shape == (2, 26) and torch.equal(ids[:, :11], prompt)
    logits = model(ids).logits
    assert torch.equal(logits[:, 10:-1].argmax(-1), ids[:, 11:])


@pytest.mark.parametrize("model", list(models()), ids=["mmrec", "llama"])
def test_generation_streams_tokens_and_returns_a_resumable_state(model):
    prompt = torch.randint(0, 64, (1, 5))
    seen = []
    ids, state = model.generate(prompt, 6, temperature=0.0, on_token=seen.append, return_state=True)
    assert torch.equal(torch.stack(seen, 1), ids[:, 5:])
    assert state.position == 11
    nxt = model(torch.tensor([[3]]), state=state).logits
    assert torch.allclose(nxt, model(torch.cat([ids, torch.tensor([[3]])], 1)).logits[:, -1:], atol=1e-5)


def test_eos_stops_generation():
    model = next(models())
    prompt = torch.randint(0, 64, (1, 4))
    first = model.generate(prompt, 1, temperature=0.0)[0, -1].item()
    ids = model.generate(prompt, 20, temperature=0.0, eos_token_id=first)
    assert ids.shape == (1, 5)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {2, 3}
    picks = {int(sample_next(logits, 1.0, top_p=0.5, generator=g)) for _ in range(200)}
    assert picks == {3}
    assert int(sample_next(logits, 0.0)) == 3


def test_bad_sampling_arguments():
    model = next(models())
    prompt = torch.zeros(1, 2, dtype=torch.long)
    for kwargs, msg in [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
    ]:
        args = {"max_new_tokens": 3, **kwargs}
        with pytest.raises(ValueError, match=msg):
            model.generate(prompt, **args)
    with pytest.raises(ValueError, match="time >= 1"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
