"""The sampler's held-out CE (diffusion_blocks.eval.sampler_ce): on fake
denoisers whose final distribution is known it is exact (deterministic chain) or
converges to the mixture's CE (stochastic chain); on the real tiny model every
position's chain is the one `generate` runs for that position's prefix."""

import math

import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.models.llama3 import kv_cache, sampler
from diffusion_blocks.models.llama3.model import Denoised
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, denoise_next_token_logits, generate,
)
from diffusion_blocks.eval.sampler_ce import (
    all_positions_next_token_logits, chain_counts, chain_log_probs, sampler_heldout_ce,
)
from test_llama_model import make_model, SEQ

VOCAB = 97


def windows(batch=4, length=SEQ + 1, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def is_sigma_min(model, sigma_B):
    return bool(torch.isclose(sigma_B[0], torch.tensor(model.partition.schedule.sigma_min)))


def fake_final_logits(monkeypatch, model, final_logits):
    """model.denoise: the real model's logits before sigma_min; at sigma_min
    `final_logits(tokens_BT, z_BTD) -> (B, T, V)`."""
    real_denoise = model.denoise

    def denoise(tokens_BT, z_BTD, sigma_B, block):
        if is_sigma_min(model, sigma_B):
            return Denoised(z_BTD, final_logits(tokens_BT, z_BTD))
        return real_denoise(tokens_BT, z_BTD, sigma_B, block)

    monkeypatch.setattr(model, "denoise", denoise)


def position_logits(seed=1):
    """W (V, T, V): a fixed next-token distribution per (context token, position)."""
    return 3 * torch.randn(VOCAB, SEQ, VOCAB, generator=torch.Generator().manual_seed(seed))


def by_context(W_VTV, tokens_BT):
    return W_VTV[tokens_BT, torch.arange(tokens_BT.shape[1])]


def true_log_probs(logits_BTV, windows_BT):
    """log softmax(logits)[true next token] at every position, (B, T - 1)."""
    log_probs_BTV = torch.log_softmax(logits_BTV.double(), -1)
    return log_probs_BTV.gather(-1, windows_BT[:, 1:, None]).squeeze(-1)


# ---------------------------------------------------------------------------
# Fakes with a known answer


@pytest.mark.parametrize("sampler_name", ["euler", "ancestral"])
def test_final_distribution_that_ignores_the_noise_gives_the_exact_ce_at_every_k(monkeypatch, sampler_name):
    model, data_BT, W_VTV = make_model(), windows(), position_logits()
    fake_final_logits(monkeypatch, model, lambda tokens_BT, z_BTD: by_context(W_VTV, tokens_BT))
    exact = float(-true_log_probs(by_context(W_VTV, data_BT[:, :-1]), data_BT).mean())
    seen = []

    def twin(tokens_BT):  # an end-to-end model with the same next-token distribution
        return by_context(W_VTV, tokens_BT)

    result = sampler_heldout_ce(model, data_BT, DecodingConfig(sampler=sampler_name), chains=7,
                                twin=twin, chains_per_call=3, on_chains=seen.append)
    assert result.twin_ce == pytest.approx(exact, abs=1e-5)
    assert seen == [3, 6, 7]
    assert sorted(result.ce_by_chains) == [1, 3, 7]
    for ce in result.ce_by_chains.values():
        assert ce == pytest.approx(exact, abs=1e-9)
    assert result.ce == pytest.approx(exact, abs=1e-9)
    assert result.positions == 4 * SEQ and result.chains == 7 and result.sampler == sampler_name


def two_token_fake(monkeypatch, model, q_a, token_a, token_b, P_a_V, P_b_V):
    """Before sigma_min every row's logits put q_a on token_a, 1 - q_a on token_b (the
    ancestral step draws one and renoises it); at sigma_min the fake reads which one z
    holds (nearest clean embedding) and answers P_a or P_b. So the final distribution
    averaged over chains is q_a P_a + (1 - q_a) P_b."""
    table_VD = model.clean_embedding_table().detach()

    def denoise(tokens_BT, z_BTD, sigma_B, block):
        batch, seq_len, _ = z_BTD.shape
        if is_sigma_min(model, sigma_B):
            distances_BTV = torch.cdist(z_BTD, table_VD[None].expand(batch, -1, -1))
            holds_a_BT = distances_BTV.argmin(-1) == token_a
            assert bool(((distances_BTV.argmin(-1) == token_b) | holds_a_BT).all())
            probs_BTV = torch.where(holds_a_BT[..., None], P_a_V, P_b_V)
            return Denoised(z_BTD, probs_BTV.log())
        logits_BTV = torch.full((batch, seq_len, VOCAB), -100.0)
        logits_BTV[..., token_a] = math.log(q_a)
        logits_BTV[..., token_b] = math.log(1 - q_a)
        return Denoised(z_BTD, logits_BTV)

    monkeypatch.setattr(model, "denoise", denoise)


def test_stochastic_chain_converges_to_the_ce_of_the_averaged_distribution(monkeypatch):
    """Rao-Blackwellised: the mean of the chains' softmax, not of their log-probs
    (that would converge to the mean CE of P_a and P_b, a Jensen gap above)."""
    model, data_BT = make_model(), windows()
    gen = torch.Generator().manual_seed(2)
    P_a_V = torch.softmax(4 * torch.randn(VOCAB, generator=gen), -1)
    P_b_V = torch.softmax(4 * torch.randn(VOCAB, generator=gen), -1)
    q_a = 0.3
    two_token_fake(monkeypatch, model, q_a, 5, 9, P_a_V, P_b_V)
    labels = data_BT[:, 1:]
    truth = float(-(q_a * P_a_V[labels] + (1 - q_a) * P_b_V[labels]).log().mean())
    mean_of_logs = float(-(q_a * P_a_V[labels].log() + (1 - q_a) * P_b_V[labels].log()).mean())
    assert mean_of_logs - truth > 1.0  # the test can tell the two apart

    config = DecodingConfig(sampler="ancestral")
    one = sampler_heldout_ce(model, data_BT, config, chains=1, seed=3)
    many = sampler_heldout_ce(model, data_BT, config, chains=256, seed=3, chains_per_call=64)
    assert one.ce - truth > 0.5  # one chain: one of P_a, P_b per position
    assert many.ce == pytest.approx(truth, abs=0.05)
    assert sorted(many.ce_by_chains) == [64, 128, 256]
    assert 0 < many.stderr < 0.5
    assert many.floor_fraction == float((q_a * P_a_V[labels] + (1 - q_a) * P_b_V[labels] < 1e-6).double().mean())


def test_floor_fraction_counts_positions_below_one_in_a_million(monkeypatch):
    model, data_BT = make_model(), windows(batch=2)
    labels_BT = data_BT[:, 1:]

    def final_logits(tokens_BT, z_BTD):  # p(true) = 1e-9 at even positions, about 1 at odd
        logits_BTV = torch.zeros(*tokens_BT.shape, VOCAB)
        logits_BTV.scatter_(-1, labels_BT[..., None], 30.0)
        logits_BTV[:, 0::2].scatter_(-1, labels_BT[:, 0::2, None], -30.0)
        return logits_BTV

    fake_final_logits(monkeypatch, model, final_logits)
    result = sampler_heldout_ce(model, data_BT, DecodingConfig(sampler="euler"), chains=2)
    assert result.floor_fraction == 0.5
    assert math.isfinite(result.ce) and result.ce > 0.5 * 30  # kept, not clamped


def test_chain_counts_are_a_quarter_half_and_all():
    assert chain_counts(16) == [4, 8, 16]
    assert chain_counts(2) == [1, 2]
    assert chain_counts(1) == [1]


@pytest.mark.parametrize("kwargs, message", [
    ({"chains": 0}, "chains must be >= 1"),
    ({"chains": 2, "chains_per_call": 0}, "chains_per_call must be >= 1"),
    ({"chains": 2, "windows_BT": torch.zeros(3, 1, dtype=torch.long)}, "T >= 2"),
    ({"chains": 2, "windows_BT": torch.zeros(5, dtype=torch.long)}, "(B, T)"),
])
def test_bad_inputs_are_refused(kwargs, message):
    kwargs = {"windows_BT": windows(batch=1), **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sampler_heldout_ce(make_model(), config=DecodingConfig(), **kwargs)


def test_an_end_to_end_model_is_refused():
    with pytest.raises(ValueError, match="denoiser"):
        sampler_heldout_ce(torch.nn.Linear(2, 2), windows(), DecodingConfig(), chains=1)


# ---------------------------------------------------------------------------
# The real tiny model: every position's chain is generate's chain for its prefix


def shared_start_noise(monkeypatch, noise_BTD, position):
    """The chain's start noise from noise_BTD: every row at once (B * T rows) or, for a
    last-row chain (B rows), the rows of position[0]."""
    batch, seq_len, dim = noise_BTD.shape

    def uninformative_state(shape, sigma, generator, like):
        if shape[0] == batch * seq_len:
            return sigma * noise_BTD.reshape(batch * seq_len, dim)
        return sigma * noise_BTD[:, position[0]]

    monkeypatch.setattr(sampler, "uninformative_state", uninformative_state)


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_each_positions_chain_is_the_last_row_chain_of_its_prefix(monkeypatch, sampler_name):
    model, data_BT = make_model(), windows(batch=2)
    context_BT = data_BT[:, :-1]
    config = DecodingConfig(sampler=sampler_name, steps_per_block=2)
    position = [0]
    shared_start_noise(monkeypatch, torch.randn(2, SEQ, 64, generator=torch.Generator().manual_seed(4)), position)

    all_BTV = all_positions_next_token_logits(model, context_BT, config, torch.Generator())
    per_position = []
    for t in range(SEQ):
        position[0] = t
        per_position.append(denoise_next_token_logits(model, context_BT[:, :t + 1], config, torch.Generator()))
    last_row_BTV = torch.stack(per_position, dim=1)
    assert torch.allclose(all_BTV, last_row_BTV, atol=1e-4, rtol=1e-4)
    # the estimator scores exactly these distributions against the true next tokens
    log_probs_BT = chain_log_probs(model, data_BT, config, torch.Generator())[0]
    assert torch.allclose(log_probs_BT, true_log_probs(last_row_BTV, data_BT), atol=1e-4)
    ce = sampler_heldout_ce(model, data_BT, config, chains=1).ce
    assert ce == pytest.approx(float(-true_log_probs(last_row_BTV, data_BT).mean()), abs=1e-4)


def record_steps(monkeypatch, model) -> list[tuple[float, int]]:
    """Wrap model.denoise: every call's (sigma, block)."""
    calls, real_denoise = [], model.denoise

    def denoise(tokens_BT, z_BTD, sigma_B, block):
        calls.append((round(float(sigma_B[0]), 6), block))
        return real_denoise(tokens_BT, z_BTD, sigma_B, block)

    monkeypatch.setattr(model, "denoise", denoise)
    return calls


@pytest.mark.parametrize("sampler_name, churn", [("ancestral", 0.0), ("euler", 0.5), ("heun", 0.0)])
def test_the_estimator_calls_the_blocks_generate_calls(monkeypatch, sampler_name, churn):
    model = make_model(num_blocks=4)
    monkeypatch.setattr(kv_cache, "caches_denoiser", lambda model: False)
    calls = record_steps(monkeypatch, model)
    config = DecodingConfig(max_new_tokens=1, sampler=sampler_name, churn=churn, steps_per_block=2)
    generate(model, windows(batch=1, length=5), config, SEQ)
    generated = list(calls)
    calls.clear()
    sampler_heldout_ce(model, windows(batch=1), config, chains=1)
    assert calls == generated
    assert {block for _, block in calls} == {0, 1, 2, 3}
