"""Self-conditioning (issue 21, lever b): `[diffusion_blocks] self_conditioning = p`.

The model: noisy rows take W_sc s (s a previous clean estimate; W_sc starts at zero), each
row only its own. Training: a first pass without it, whose estimate a share p of the
sequences get. Sampling: every block call hands its estimate to the next, through the
uncached, KV-cached and all-positions paths alike."""

import math

import pytest
import torch

from diffusion_blocks import diffusion
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.eval.sampler_ce import all_positions_next_token_logits
from diffusion_blocks.models.llama3 import kv_cache, sampler
from diffusion_blocks.models.llama3.args import DenoiserOptions
from diffusion_blocks.models.llama3.model import is_added_by_conversion
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, denoise_next_token_logits, generate, self_conditioned,
)
from diffusion_blocks.models.llama3.task import LanguageModelTask
from test_kv_cache import both_ways, sharpen_attention, tokens
from test_llama_model import make_model, SEQ
from test_train_loop import data_of, make_trainer, run_step  # noqa: F401 (fixture)

VOCAB = 97


def self_conditioning_model(p=0.5, num_blocks=2, n_layers=4, dtype=torch.float32):
    """A tiny denoiser with self-conditioning whose W_sc is far from its zero start."""
    model = make_model(num_blocks=num_blocks, n_layers=n_layers, n_kv_heads=2,
                       denoiser=DenoiserOptions(self_conditioning=p))
    with torch.no_grad():
        model.self_cond_proj.weight.normal_(std=1.0, generator=torch.Generator().manual_seed(3))
    model = sharpen_attention(model)
    return model.double() if dtype == torch.float64 else model


def noisy_inputs(seed=0, batch=2):
    generator = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    z_BTD = torch.randn(batch, SEQ, 64, generator=generator)
    estimate_BTD = torch.randn(batch, SEQ, 64, generator=generator)
    return tokens_BT, z_BTD, estimate_BTD


# ---------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("value", ["1.0", "-0.1", "nan"])
def test_bad_self_conditioning_is_a_one_line_config_error(write_toml, value):
    path = write_toml("bad.toml", f"[diffusion_blocks]\nself_conditioning = {value}\n")
    with pytest.raises(ConfigError) as info:
        parse_job_config(["--job.config_file", str(path)])
    message = str(info.value)
    assert "self_conditioning" in message and "\n" not in message.strip()


def test_off_by_default_and_the_model_then_has_no_projection():
    model = make_model()
    assert DenoiserOptions().self_conditioning == 0.0
    assert model.self_cond_proj is None and not model.self_conditions
    assert not any("self_cond" in name for name in model.state_dict())
    tokens_BT, z_BTD, estimate_BTD = noisy_inputs()
    with pytest.raises(ValueError, match="self_conditioning > 0"):
        model.denoise(tokens_BT, z_BTD, torch.ones(2), 0, estimate_BTD)


# ---------------------------------------------------------------------------
# The model


def test_the_projection_starts_at_zero_and_is_a_conversion_key():
    model = make_model(n_layers=4, denoiser=DenoiserOptions(self_conditioning=0.5))
    assert model.self_conditions and torch.count_nonzero(model.self_cond_proj.weight) == 0
    assert model.self_cond_proj.bias is None
    # a stock checkpoint lacks it: the loader leaves it at its (zero) init
    assert is_added_by_conversion("self_cond_proj.weight")
    tokens_BT, z_BTD, estimate_BTD = noisy_inputs()
    sigma_B = torch.tensor([0.5, 4.0])
    without = model.denoise(tokens_BT, z_BTD, sigma_B, 0).logits_BTV
    with_estimate = model.denoise(tokens_BT, z_BTD, sigma_B, 0, estimate_BTD).logits_BTV
    assert torch.equal(without, with_estimate)


@pytest.mark.parametrize("row", [0, 5, SEQ - 1])
def test_an_estimate_moves_only_its_own_noisy_row(row):
    model = self_conditioning_model()
    tokens_BT, z_BTD, estimate_BTD = noisy_inputs()
    sigma_B = torch.tensor([0.5, 4.0])
    reference_BTV = model.denoise(tokens_BT, z_BTD, sigma_B, 1, estimate_BTD).logits_BTV
    moved_BTD = estimate_BTD.clone()
    moved_BTD[:, row] += 1.0
    logits_BTV = model.denoise(tokens_BT, z_BTD, sigma_B, 1, moved_BTD).logits_BTV
    others = [j for j in range(SEQ) if j != row]
    assert torch.allclose(logits_BTV[:, others], reference_BTV[:, others], atol=1e-5)
    assert not torch.allclose(logits_BTV[:, row], reference_BTV[:, row], atol=1e-3)
    # None is the zero estimate
    zero_BTV = model.denoise(tokens_BT, z_BTD, sigma_B, 1, torch.zeros_like(z_BTD)).logits_BTV
    assert torch.allclose(model.denoise(tokens_BT, z_BTD, sigma_B, 1).logits_BTV, zero_BTV, atol=1e-6)


def test_expected_clean_is_softmax_times_the_clean_table():
    model = self_conditioning_model()
    logits_NV = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(2))
    table_VD = model.clean_embedding_table()
    expected_ND = torch.softmax(logits_NV, -1) @ table_VD
    assert torch.allclose(model.expected_clean(logits_NV), expected_ND, atol=1e-6)


# ---------------------------------------------------------------------------
# Training: the first pass, its estimate for a share p of the sequences


def recorded_forwards(monkeypatch, model):
    calls, real_forward = [], model.forward

    def forward(*args, **kwargs):
        estimate = kwargs.get("self_cond_BTD")
        calls.append((torch.is_grad_enabled(), None if estimate is None else estimate.clone()))
        out = real_forward(*args, **kwargs)
        calls[-1] += (out.detach().clone(),)
        return out

    monkeypatch.setattr(model, "forward", forward)
    return calls


def training_loss(model, p_batch=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens_BT = torch.randint(0, VOCAB, (p_batch, SEQ + 1), generator=generator)
    inputs, labels = {"input": tokens_BT[:, :-1]}, tokens_BT[:, 1:]
    sigma_B = torch.full((p_batch,), 0.7)
    return LanguageModelTask().denoiser_loss(model, inputs, labels, 0, sigma_B, generator)


@pytest.mark.parametrize("p", [0.25, 0.75])
def test_training_feeds_the_first_pass_estimate_to_a_share_p_of_the_sequences(monkeypatch, p):
    model = self_conditioning_model(p=p).train()
    calls = recorded_forwards(monkeypatch, model)
    loss_sum = training_loss(model)[0]
    assert len(calls) == 2
    (first_grad, first_estimate, first_logits), (second_grad, estimate_BTD, _) = calls
    assert not first_grad and first_estimate is None and second_grad
    fed_B = estimate_BTD.flatten(1).abs().amax(-1) > 0
    # the fed rows hold exactly the first pass's estimate, the others zero
    expected_BTD = model.expected_clean(first_logits)
    assert torch.allclose(estimate_BTD[fed_B], expected_BTD[fed_B], atol=1e-6)
    assert float(fed_B.float().mean()) == pytest.approx(p, abs=0.2)
    # the gradient reaches W_sc through the fed rows
    loss_sum.backward()
    assert model.self_cond_proj.weight.grad is not None
    assert float(model.self_cond_proj.weight.grad.abs().sum()) > 0


def test_without_self_conditioning_training_runs_one_pass(monkeypatch):
    model = make_model(n_layers=4).train()
    calls = recorded_forwards(monkeypatch, model)
    training_loss(model)
    assert [(grad, estimate) for grad, estimate, _ in calls] == [(True, None)]


def test_the_trainer_trains_w_sc_from_the_config(make_trainer):
    trainer = make_trainer("--diffusion_blocks.self_conditioning", "0.5")
    model = trainer.model
    assert model.self_conditions and model.options.self_conditioning == 0.5
    before = model.self_cond_proj.weight.detach().clone()
    data = data_of(trainer)
    for block in (1, 0):
        metrics = run_step(trainer, data, block)
        assert math.isfinite(metrics["loss"])
    assert not torch.equal(model.self_cond_proj.weight.detach(), before)


# ---------------------------------------------------------------------------
# Sampling: each call's estimate goes to the next


def test_self_conditioned_hands_each_calls_estimate_to_the_next():
    table_VD = torch.randn(VOCAB, 8)
    answers = [torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    received = []

    def block_logits(z_BD, sigma, block, self_cond_BD=None):
        received.append(self_cond_BD)
        return answers[len(received) - 1]

    logits = self_conditioned(block_logits, table_VD)
    for i in range(3):
        assert torch.equal(logits(torch.zeros(3, 8), 1.0, 0), answers[i])
    assert received[0] is None
    for i in (1, 2):
        expected_BD = diffusion.expected_clean_embedding(answers[i - 1], table_VD)
        assert torch.allclose(received[i], expected_BD)


@pytest.mark.parametrize("sampler_name", ["ancestral", "euler", "heun"])
def test_the_chain_passes_its_estimates_through_every_block_call(monkeypatch, sampler_name):
    model = self_conditioning_model(num_blocks=2)
    monkeypatch.setattr(kv_cache, "caches_denoiser", lambda model: False)
    calls, real_denoise = [], model.denoise

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        out = real_denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD)
        estimate = None if self_cond_BTD is None else self_cond_BTD[:, -1].clone()
        calls.append((estimate, out.logits_BTV[:, -1].clone()))
        return out

    monkeypatch.setattr(model, "denoise", denoise)
    config = DecodingConfig(sampler=sampler_name, steps_per_block=2)
    denoise_next_token_logits(model, tokens(length=4), config, torch.Generator().manual_seed(0))
    assert len(calls) >= 4 and calls[0][0] is None
    table_VD = model.clean_embedding_table()
    for (_, previous_logits), (estimate, _) in zip(calls, calls[1:]):
        expected = diffusion.expected_clean_embedding(previous_logits, table_VD)
        assert torch.allclose(estimate, expected, atol=1e-6)


@pytest.mark.parametrize("sampler_name", ["ancestral", "euler", "heun"])
def test_self_conditioning_decodes_the_same_tokens_with_and_without_the_cache(sampler_name):
    model = self_conditioning_model(dtype=torch.float64)
    cached, uncached = both_ways(model, tokens(length=3), SEQ, max_new_tokens=4,
                                 sampler=sampler_name, seed=1, temperature=1.0)
    assert torch.equal(cached, uncached)
    # and the estimates matter: the same model with W_sc zeroed decodes other logits
    config = DecodingConfig(sampler="euler", steps_per_block=2)
    with_sc = denoise_next_token_logits(model, tokens(length=5), config, torch.Generator())
    with torch.no_grad():
        model.self_cond_proj.weight.zero_()
    without_sc = denoise_next_token_logits(model, tokens(length=5), config, torch.Generator())
    assert not torch.allclose(with_sc, without_sc, atol=1e-4)


def test_every_positions_chain_is_its_prefix_chain_with_self_conditioning(monkeypatch):
    model = self_conditioning_model()
    context_BT = tokens(batch=2, length=SEQ)
    noise_BTD = torch.randn(2, SEQ, 64, generator=torch.Generator().manual_seed(4))
    position = [0]

    def uninformative_state(shape, sigma, generator, like):
        if shape[0] == 2 * SEQ:
            return sigma * noise_BTD.reshape(2 * SEQ, 64)
        return sigma * noise_BTD[:, position[0]]

    monkeypatch.setattr(sampler, "uninformative_state", uninformative_state)
    config = DecodingConfig(sampler="euler", steps_per_block=2)
    all_BTV = all_positions_next_token_logits(model, context_BT, config, torch.Generator())
    for t in (0, 4, SEQ - 1):
        position[0] = t
        last_BV = denoise_next_token_logits(model, context_BT[:, :t + 1], config, torch.Generator())
        assert torch.allclose(all_BTV[:, t], last_BV, atol=1e-4, rtol=1e-4)


def test_generate_runs_a_self_conditioning_model():
    model = self_conditioning_model()
    out = generate(model, tokens(length=3), DecodingConfig(max_new_tokens=3, seed=0), SEQ)
    assert out.shape == (2, 6)
