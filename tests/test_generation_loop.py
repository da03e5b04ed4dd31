"""The text-generation loop, `generation.generate`, end to end through the end-to-end
path (`autoregressive_next_token_logits`) with fake models whose logits are known:
greedy picks, temperature and top-k sampling that honour the seed, the context cut to
`max_context` tokens, the prompt kept in front. (The denoiser's per-token sampler is
tested with the models; here the model is anything without a `partition`.)"""

import math

import pytest
import torch

from diffusion_blocks.models.llama3.sampler import DecodingConfig, generate

V = 11  # vocabulary of the fake models


class FakeLM(torch.nn.Module):
    """A plain next-token model: logits (B, T, V) from `logits_fn(tokens_BT)`, which
    gives the logits at every position; records each context it is called with."""

    def __init__(self, logits_fn):
        super().__init__()
        self.logits_fn = logits_fn
        self.contexts: list[torch.Tensor] = []

    def forward(self, tokens_BT):
        self.contexts.append(tokens_BT.clone())
        return self.logits_fn(tokens_BT)


def one_hot_logits(next_BT: torch.Tensor) -> torch.Tensor:
    return 5.0 * torch.nn.functional.one_hot(next_BT % V, V).float()


def successor_model() -> FakeLM:
    """At every position the best next token is the token there + 1 (mod V)."""
    return FakeLM(lambda tokens: one_hot_logits(tokens + 1))


def fixed_logits_model(logits_V) -> FakeLM:
    """The same next-token logits whatever the context."""
    logits_V = torch.as_tensor(logits_V, dtype=torch.float32)
    return FakeLM(lambda tokens: logits_V.expand(*tokens.shape, V).clone())


def test_the_fake_takes_the_end_to_end_path():
    assert not hasattr(successor_model(), "partition")


def test_greedy_appends_the_argmax_after_the_prompt():
    model = successor_model()
    prompt = torch.tensor([[3, 5], [9, 10]])
    out = generate(model, prompt, DecodingConfig(max_new_tokens=4), max_context=16)
    assert out.dtype == prompt.dtype
    assert out.tolist() == [[3, 5, 6, 7, 8, 9], [9, 10, 0, 1, 2, 3]]
    # one forward per new token, each on everything so far (shorter than max_context)
    assert [c.shape[1] for c in model.contexts] == [2, 3, 4, 5]
    assert torch.equal(model.contexts[-1], out[:, :-1])


def test_zero_new_tokens_returns_the_prompt():
    prompt = torch.tensor([[1, 2, 3]])
    assert generate(successor_model(), prompt, DecodingConfig(max_new_tokens=0), 8).tolist() == [[1, 2, 3]]


def test_the_context_is_cut_to_the_last_max_context_tokens():
    # next token = sum of the context (mod V) at the last position: the cut matters
    model = FakeLM(lambda tokens: one_hot_logits(tokens.cumsum(1)))
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    out = generate(model, prompt, DecodingConfig(max_new_tokens=4), max_context=3)
    # contexts [3,4,5] -> 12 % 11 = 1; [4,5,1] -> 10; [5,1,10] -> 16 % 11 = 5; [1,10,5] -> 5
    assert out.tolist() == [[1, 2, 3, 4, 5, 1, 10, 5, 5]]
    assert [c.tolist() for c in model.contexts] == [[[3, 4, 5]], [[4, 5, 1]], [[5, 1, 10]], [[1, 10, 5]]]


def share_of(tokens: torch.Tensor, token: int) -> float:
    return float((tokens == token).float().mean())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_logits_before_sampling(temperature):
    # logits 0 and ln 2 for tokens 0 and 1 (the rest impossible): with temperature t,
    # P(1) = 2^(1/t) / (1 + 2^(1/t)): 4/5, 2/3, 0.586
    logits = [0.0, math.log(2.0)] + [-1e4] * (V - 2)
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    out = generate(fixed_logits_model(logits), prompt,
                   DecodingConfig(max_new_tokens=1, temperature=temperature, seed=0), 8)
    new = out[:, 1]
    assert set(new.tolist()) == {0, 1}
    expected = 2 ** (1 / temperature) / (1 + 2 ** (1 / temperature))
    assert share_of(new, 1) == pytest.approx(expected, abs=0.03)  # ~4 standard errors


def test_top_k_samples_only_the_k_best_in_proportion():
    logits = [5.0, 4.0, 3.0] + [2.0 - i for i in range(V - 3)]  # best: 0, 1, 2
    prompt = torch.zeros(4000, 1, dtype=torch.long)
    out = generate(fixed_logits_model(logits), prompt,
                   DecodingConfig(max_new_tokens=1, temperature=1.0, top_k=3, seed=0), 8)
    new = out[:, 1]
    assert set(new.tolist()) == {0, 1, 2}
    weights = [math.exp(5.0), math.exp(4.0), math.exp(3.0)]
    for token, weight in enumerate(weights):
        assert share_of(new, token) == pytest.approx(weight / sum(weights), abs=0.03)
    # top_k = 1 is greedy whatever the temperature
    one = generate(fixed_logits_model(logits), prompt[:50],
                   DecodingConfig(max_new_tokens=3, temperature=5.0, top_k=1, seed=0), 8)
    assert (one[:, 1:] == 0).all()


def sampled(seed: int) -> torch.Tensor:
    prompt = torch.tensor([[1], [2], [3], [4]])
    config = DecodingConfig(max_new_tokens=12, temperature=1.0, top_k=0, seed=seed)
    return generate(fixed_logits_model(torch.zeros(V)), prompt, config, 8)  # uniform


def test_sampling_is_reproducible_from_the_seed_and_only_from_it():
    torch.manual_seed(0)
    first = sampled(seed=7)
    torch.manual_seed(12345)  # the global generator plays no part
    again = sampled(seed=7)
    assert torch.equal(first, again)
    assert not torch.equal(first, sampled(seed=8))
    assert first[:, 0].tolist() == [1, 2, 3, 4]
    assert len(set(first[:, 1:].flatten().tolist())) > 5  # uniform over 11 tokens: varied
