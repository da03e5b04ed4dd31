"""The LM denoiser's token samplers (diffusion_blocks.models.llama3.sampler), on a tiny
real model whose `denoise` is wrapped: every call's noisy state, sigma and block are
recorded, and where a test needs it the logits are replaced by ones it controls."""

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks import diffusion
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.models.llama3 import kv_cache
from diffusion_blocks.models.llama3.model import Denoised
from diffusion_blocks.models.llama3.sampler import (
    ancestral_token_step, DecodingConfig, generate, owner_of,
)
from test_llama_model import make_model, SEQ

REPO_TOOLS = Path(__file__).resolve().parents[1] / "tools"
BIG = 100.0  # a logit margin that makes softmax one-hot in float32


class Call(NamedTuple):
    z_BD: torch.Tensor      # the last noisy row's state handed to the block
    sigma: float
    block: int
    logits_BV: torch.Tensor  # what the sampler got back


def record_denoise(monkeypatch, model, logits=None) -> list[Call]:
    """Wrap model.denoise; `logits(sigma, block, batch) -> (B, V)` replaces the model's
    logits at the last row (the raw denoised estimate is left as the model made it).
    generate then decodes uncached: the KV cache runs the layers itself, not through
    model.denoise (test_kv_cache.py shows both paths give the same logits)."""
    calls, real_denoise = [], model.denoise
    monkeypatch.setattr(kv_cache, "caches_denoiser", lambda model: False)

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        out = real_denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD)
        if logits is not None:
            logits_BTV = out.logits_BTV.clone()
            logits_BTV[:, -1] = logits(float(sigma_B[0]), block, z_BTD.shape[0])
            out = Denoised(out.denoised_BTD, logits_BTV)
        calls.append(Call(z_BTD[:, -1].clone(), float(sigma_B[0]), block, out.logits_BTV[:, -1]))
        return out

    monkeypatch.setattr(model, "denoise", denoise)
    return calls


def one_hot_logits(token, vocab, batch):
    logits_BV = torch.zeros(batch, vocab)
    logits_BV[:, token] = BIG
    return logits_BV


def normalised_table(model):
    """By hand: the token embeddings, each row scaled to norm 1."""
    weight = model.tok_embeddings.weight.detach()
    return weight / weight.norm(dim=-1, keepdim=True)


def prompt(batch=2, length=4, seed=0):
    return torch.randint(0, 16, (batch, length), generator=torch.Generator().manual_seed(seed))


def euler_denoised(calls: list[Call]) -> list[torch.Tensor]:
    """The D each Euler step used, recovered from z' = z + (sigma' - sigma)(z - D)/sigma."""
    return [
        now.z_BD - (after.z_BD - now.z_BD) * now.sigma / (after.sigma - now.sigma)
        for now, after in zip(calls, calls[1:])
    ]


def test_euler_step_with_one_hot_logits_uses_that_tokens_normalised_embedding(monkeypatch):
    model = make_model()
    token, vocab = 5, model.tok_embeddings.weight.shape[0]
    calls = record_denoise(monkeypatch, model, lambda sigma, block, batch: one_hot_logits(token, vocab, batch))
    generate(model, prompt(), DecodingConfig(max_new_tokens=1, steps_per_block=2, sampler="euler"), SEQ)
    assert len(calls) == 2 * 2 + 1
    for denoised_BD in euler_denoised(calls):
        assert torch.allclose(denoised_BD, normalised_table(model)[token].expand_as(denoised_BD), atol=1e-4)


def test_euler_step_uses_softmax_of_the_logits_times_the_normalised_table(monkeypatch):
    model = make_model()
    vocab = model.tok_embeddings.weight.shape[0]
    gen = torch.Generator().manual_seed(3)
    calls = record_denoise(monkeypatch, model, lambda sigma, block, batch: 3 * torch.randn(batch, vocab, generator=gen))
    generate(model, prompt(), DecodingConfig(max_new_tokens=1, steps_per_block=2, sampler="euler"), SEQ)
    for call, denoised_BD in zip(calls, euler_denoised(calls)):
        probs_BV = torch.softmax(call.logits_BV, -1)
        assert torch.allclose(probs_BV.sum(-1), torch.ones(probs_BV.shape[0]))
        assert torch.allclose(denoised_BD, probs_BV @ normalised_table(model), atol=1e-4)


def test_euler_denoised_lies_in_the_convex_hull_of_the_normalised_table(monkeypatch):
    """The model's own logits, vocabulary 16 < dim 64: D = E_hat^T p has one solution p,
    which must be a distribution."""
    model = make_model(vocab_size=16)
    calls = record_denoise(monkeypatch, model)
    generate(model, prompt(batch=4), DecodingConfig(max_new_tokens=2, steps_per_block=2, sampler="euler"), SEQ)
    table_VD = normalised_table(model)
    for denoised_BD in euler_denoised(calls[:5]) + euler_denoised(calls[5:]):
        p_BV = torch.linalg.lstsq(table_VD.T.double(), denoised_BD.T.double()).solution.T
        assert torch.allclose((p_BV @ table_VD.double()), denoised_BD.double(), atol=1e-4)
        assert p_BV.min() > -1e-4
        assert torch.allclose(p_BV.sum(-1), torch.ones(p_BV.shape[0], dtype=torch.float64), atol=1e-4)


def test_ancestral_step_draws_from_the_distribution_and_renoises_to_the_next_sigma():
    model = make_model()
    table_VD = model.clean_embedding_table().detach()
    rows, sigma, sigma_next = 4000, 1.0, 0.05
    logits_BV = torch.full((rows, table_VD.shape[0]), -BIG)
    logits_BV[:, 3], logits_BV[:, 7] = 0.0, torch.log(torch.tensor(3.0))  # p = 1/4, 3/4
    z_BD = torch.randn(rows, table_VD.shape[1])
    z_next_BD = ancestral_token_step(z_BD, logits_BV, table_VD, sigma, sigma_next,
                                     torch.Generator().manual_seed(0))
    drew_7_B = (z_next_BD - normalised_table(model)[7]).norm(dim=-1) < (
        z_next_BD - normalised_table(model)[3]).norm(dim=-1)
    assert abs(drew_7_B.float().mean() - 0.75) < 0.03
    clean_BD = torch.where(drew_7_B[:, None], normalised_table(model)[7], normalised_table(model)[3])
    noise_BD = (z_next_BD - clean_BD) / sigma_next
    assert abs(noise_BD.std() - 1.0) < 0.02 and abs(noise_BD.mean()) < 0.01


def test_ancestral_sampler_hands_each_block_a_normalised_token_noised_to_its_sigma(monkeypatch):
    model = make_model()
    token, vocab = 9, model.tok_embeddings.weight.shape[0]
    calls = record_denoise(monkeypatch, model, lambda sigma, block, batch: one_hot_logits(token, vocab, batch))
    generate(model, prompt(batch=64), DecodingConfig(max_new_tokens=1, steps_per_block=2, sampler="ancestral"), SEQ)
    for call in calls[1:]:  # every state after the first step
        noise_BD = (call.z_BD - normalised_table(model)[token]) / call.sigma
        assert abs(noise_BD.std() - 1.0) < 0.05 and abs(noise_BD.mean()) < 0.05


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_final_token_is_read_by_the_sigma_min_block_after_the_last_step(monkeypatch, sampler):
    model = make_model(num_blocks=2)
    vocab, sigma_min = model.tok_embeddings.weight.shape[0], model.partition.schedule.sigma_min

    def logits(sigma, block, batch):  # token 10 * block + (1 at sigma_min)
        return one_hot_logits(10 * block + int(sigma == pytest.approx(sigma_min)), vocab, batch)

    calls = record_denoise(monkeypatch, model, logits)
    config = DecodingConfig(max_new_tokens=1, steps_per_block=3, sampler=sampler)
    tokens = generate(model, prompt(), config, SEQ)
    plan = model.partition.sampling_plan(2 * 3)
    assert [c.sigma for c in calls] == pytest.approx([s.sigma for s in plan] + [sigma_min])
    assert [c.block for c in calls] == [s.block for s in plan] + [owner_of(model.partition, sigma_min)]
    assert owner_of(model.partition, sigma_min) == 1
    assert tokens[:, -1].tolist() == [11, 11]


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_temperature_changes_only_the_final_pick(monkeypatch, sampler):
    model = make_model()
    trajectories = {}
    for temperature in (0.0, 3.0):
        calls = record_denoise(monkeypatch, model)
        config = DecodingConfig(max_new_tokens=1, steps_per_block=2, sampler=sampler,
                                temperature=temperature, seed=4)
        tokens = generate(model, prompt(batch=32), config, SEQ)
        trajectories[temperature] = (calls, tokens[:, -1])
        monkeypatch.undo()
    (greedy_calls, greedy), (hot_calls, hot) = trajectories[0.0], trajectories[3.0]
    assert len(greedy_calls) == len(hot_calls)
    for a, b in zip(greedy_calls, hot_calls):
        assert (a.sigma, a.block) == (b.sigma, b.block)
        assert torch.equal(a.z_BD, b.z_BD) and torch.equal(a.logits_BV, b.logits_BV)
    final_logits_BV = greedy_calls[-1].logits_BV
    assert torch.equal(greedy, final_logits_BV.argmax(-1))
    assert not torch.equal(hot, greedy)  # the hot final pick is a draw


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_seeded_generation_is_reproducible(sampler):
    model = make_model()

    def run(seed):
        config = DecodingConfig(max_new_tokens=4, sampler=sampler, seed=seed, temperature=1.0)
        return generate(model, prompt(batch=8), config, SEQ)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_steps_per_block_churn_and_start_sigma_set_the_states_the_blocks_see(monkeypatch):
    model = make_model(num_blocks=2)
    partition, schedule = model.partition, model.partition.schedule
    calls = record_denoise(monkeypatch, model)
    generate(model, prompt(batch=64), DecodingConfig(max_new_tokens=1, steps_per_block=2, start_sigma=3.0), SEQ)
    plan = partition.sampling_plan(4, start_sigma=3.0)
    assert plan[0].sigma == 3.0 and [c.sigma for c in calls[:-1]] == pytest.approx([s.sigma for s in plan])
    assert abs(calls[0].z_BD.std() / 3.0 - 1) < 0.05  # uninformative state at the start sigma

    calls = record_denoise(monkeypatch, model)
    generate(model, prompt(), DecodingConfig(max_new_tokens=1, steps_per_block=2, churn=2.0), SEQ)
    plan = partition.sampling_plan(4)
    gamma = diffusion.churn_gamma(2.0, 4)
    churned = [min(s.sigma * (1 + gamma), schedule.sigma_max) for s in plan]
    assert gamma > 0 and [c.sigma for c in calls[:-1]] == pytest.approx(churned)
    assert [c.block for c in calls[:-1]] == [owner_of(partition, s) for s in churned]


@pytest.mark.parametrize("bad", [
    dict(steps_per_block=0), dict(sampler="rk4"), dict(temperature=-1.0), dict(top_k=-1),
    dict(churn=-0.5), dict(start_sigma=0.0),
])
def test_decoding_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        DecodingConfig(**bad)


def test_start_sigma_outside_the_schedule_is_refused():
    model = make_model()
    with pytest.raises(ConfigError, match="start_sigma must lie in"):
        generate(model, prompt(), DecodingConfig(max_new_tokens=1, start_sigma=100.0), SEQ)


def test_generate_tool_refuses_zero_steps_per_block_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_TOOLS / "generate.py"), "--job.config_file",
         str(REPO_TOOLS.parent / "train_configs" / "llama3_debug.toml"),
         "--checkpoint", str(tmp_path), "--steps-per-block", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: argument --steps-per-block/--recurrence: must be >= 1, got 0"
    )


@pytest.mark.parametrize("option, flag", [
    ({"sampler": "heun"}, "--sampler"), ({"churn": 1.0}, "--churn"),
    ({"start_sigma": 5.0}, "--start-sigma"), ({"steps_per_block": 2}, "--steps-per-block"),
    ({"stop_sigma": 1.0}, "--stop-sigma"),
])
def test_the_end_to_end_twin_refuses_the_denoiser_only_flags(option, flag):
    """tools/generate.py on an end-to-end checkpoint: a flag only a denoiser reads is
    refused (one line), not silently ignored."""
    from diffusion_blocks.models.llama3.sampler import continue_prompt
    from diffusion_blocks.protocols.family import TextRequest

    twin = torch.nn.Linear(1, 1)  # no partition: what continue_prompt sees of a twin
    with pytest.raises(ValueError, match=rf"^{flag} does not apply to dblocks_llama3 end to end"):
        continue_prompt(None, "dblocks_llama3", twin, None, None, TextRequest(**option))


@pytest.mark.parametrize("family", ["md4", "recurrent"])
def test_families_without_a_stoppable_chain_refuse_stop_sigma(family):
    """--stop-sigma acts on the block-partitioned LM's chain only: MD4 and the
    recurrent denoiser refuse it in one line."""
    import types
    from diffusion_blocks.protocols.family import TextRequest
    if family == "md4":
        from diffusion_blocks.models.md4.sampler import sample_text
    else:
        from diffusion_blocks.models.recurrent import FAMILY
        denoiser = types.SimpleNamespace(partition=object())  # refused before any use
        sample_text = lambda _, *rest: FAMILY.sample_text(denoiser, *rest)
    with pytest.raises(ValueError, match=r"^--stop-sigma does not apply to (dblocks_md4|dblocks_recurrent) text"):
        sample_text(None, None, None, TextRequest(stop_sigma=1.0))
