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
    all_positions_next_token_logits, block_ends, block_losses, chain_counts, chain_log_probs,
    sampler_heldout_ce,
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

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        if is_sigma_min(model, sigma_B):
            return Denoised(z_BTD, final_logits(tokens_BT, z_BTD))
        return real_denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD)

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

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
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


def two_token_mixture(monkeypatch, model, data_BT, q_a=0.3):
    """two_token_fake with random P_a, P_b; (P_a, P_b, q_a, the CE of the averaged
    final distribution q_a P_a + (1 - q_a) P_b on data_BT's labels)."""
    gen = torch.Generator().manual_seed(2)
    P_a_V = torch.softmax(4 * torch.randn(VOCAB, generator=gen), -1)
    P_b_V = torch.softmax(4 * torch.randn(VOCAB, generator=gen), -1)
    two_token_fake(monkeypatch, model, q_a, 5, 9, P_a_V, P_b_V)
    labels = data_BT[:, 1:]
    truth = float(-(q_a * P_a_V[labels] + (1 - q_a) * P_b_V[labels]).log().mean())
    return P_a_V, P_b_V, q_a, truth


def test_stochastic_chain_converges_to_the_ce_of_the_averaged_distribution(monkeypatch):
    """Rao-Blackwellised: the mean of the chains' softmax, not of their log-probs
    (that would converge to the mean CE of P_a and P_b, a Jensen gap above)."""
    model, data_BT = make_model(), windows()
    P_a_V, P_b_V, q_a, truth = two_token_mixture(monkeypatch, model, data_BT)
    labels = data_BT[:, 1:]
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
    points, log_probs_CPBT = chain_log_probs(model, data_BT, config, torch.Generator())
    assert torch.allclose(log_probs_CPBT[0, -1], true_log_probs(last_row_BTV, data_BT), atol=1e-4)
    ce = sampler_heldout_ce(model, data_BT, config, chains=1).ce
    assert ce == pytest.approx(float(-true_log_probs(last_row_BTV, data_BT).mean()), abs=1e-4)


def record_steps(monkeypatch, model) -> list[tuple[float, int]]:
    """Wrap model.denoise: every call's (sigma, block)."""
    calls, real_denoise = [], model.denoise

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        calls.append((round(float(sigma_B[0]), 6), block))
        return real_denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD)

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


# ---------------------------------------------------------------------------
# The decision profile and the sampler stopped early (stop_sigma)


def chain_points(model, config):
    """The (sigma, block) of every state a chain reaches: each step's start, then the
    final read."""
    plan = sampler.decoding_plan(model.partition, config)
    return [(s.sigma, s.block) for s in plan] + [
        (sampler.final_sigma(model.partition, plan, config),
         sampler.owner_of(model.partition, sampler.final_sigma(model.partition, plan, config)))]


def test_the_profile_reads_every_state_of_the_chain_and_ends_at_the_final_ce():
    model, data_BT = make_model(num_blocks=4), windows(batch=2)
    config = DecodingConfig(sampler="ancestral", steps_per_block=2)
    result = sampler_heldout_ce(model, data_BT, config, chains=4, chains_per_call=2)
    assert [(p.sigma, p.block) for p in result.profile] == chain_points(model, config)
    assert len(result.profile) == 4 * 2 + 1
    assert [p.block for p in result.profile] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert result.profile[-1].ce == result.ce
    assert result.profile[-1].ce_by_chains == result.ce_by_chains
    assert result.best_point().ce == min(p.ce for p in result.profile)


def test_a_chain_whose_every_state_gives_the_same_distribution_is_exact_at_every_point(monkeypatch):
    model, data_BT, W_VTV = make_model(num_blocks=4), windows(), position_logits()

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        return Denoised(z_BTD, by_context(W_VTV, tokens_BT))

    monkeypatch.setattr(model, "denoise", denoise)
    exact = float(-true_log_probs(by_context(W_VTV, data_BT[:, :-1]), data_BT).mean())
    result = sampler_heldout_ce(model, data_BT, DecodingConfig(sampler="ancestral"), chains=3)
    for point in result.profile:
        assert point.ce == pytest.approx(exact, abs=1e-9)
    assert list(block_losses(result.profile).values()) == pytest.approx([0.0] * 4, abs=1e-9)


@pytest.mark.parametrize("sampler_name", ["ancestral", "euler"])
def test_the_sampler_stopped_at_a_profile_sigma_scores_that_point_exactly(sampler_name):
    """Same seed, one batch of chains: the stopped chain makes the same draws up to its
    stop, so its CE is the full chain's profile point there, bit for bit."""
    model, data_BT = make_model(num_blocks=4), windows(batch=2)
    config = DecodingConfig(sampler=sampler_name, steps_per_block=2)
    full = sampler_heldout_ce(model, data_BT, config, chains=3, seed=5, chains_per_call=3)
    for j in (0, 1, 3, 6):
        point = full.profile[j]
        stopped = sampler_heldout_ce(
            model, data_BT, DecodingConfig(sampler=sampler_name, steps_per_block=2,
                                           stop_sigma=point.sigma),
            chains=3, seed=5, chains_per_call=3,
        )
        assert len(stopped.profile) == j + 1
        assert stopped.ce == point.ce and stopped.stop_sigma == point.sigma
        assert [p.ce for p in stopped.profile] == [p.ce for p in full.profile[:j + 1]]


def test_a_stopped_chain_calls_only_the_blocks_above_its_stop(monkeypatch):
    model = make_model(num_blocks=4)
    monkeypatch.setattr(kv_cache, "caches_denoiser", lambda model: False)
    calls = record_steps(monkeypatch, model)
    plan = model.partition.sampling_plan(4)
    stop = plan[1].sigma  # block 1's first sigma: block 0 steps, block 1 reads
    config = DecodingConfig(max_new_tokens=1, stop_sigma=stop, temperature=1.0)
    generate(model, windows(batch=1, length=5), config, SEQ)
    assert calls == [(round(plan[0].sigma, 6), 0), (round(stop, 6), 1)]
    assert sampler.forwards_per_token(model, config) == 2
    # a stop between grid points stops at the lowest grid sigma above it
    between = sampler.decoding_plan(model.partition, DecodingConfig(stop_sigma=0.9 * stop))
    assert between == plan[:1]


@pytest.mark.parametrize("stop_sigma, message", [
    (0.0, "stop_sigma must be > 0"),
    (1e-4, r"stop_sigma must lie in \[sigma_min, start sigma\]"),
    (81.0, r"stop_sigma must lie in \[sigma_min, start sigma\] = \[0.002, 80.0\]"),
])
def test_a_stop_sigma_outside_the_chain_is_refused(stop_sigma, message):
    from diffusion_blocks.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        sampler.decoding_plan(make_model().partition, DecodingConfig(stop_sigma=stop_sigma))


def test_block_losses_are_the_rise_from_one_blocks_last_reading_to_the_next():
    from diffusion_blocks.eval.sampler_ce import ProfilePoint
    profile = [ProfilePoint(80.0, 0, 2.5, {}, 0.0), ProfilePoint(20.0, 0, 2.1, {}, 0.0),
               ProfilePoint(5.0, 1, 2.4, {}, 0.0), ProfilePoint(1.0, 2, 2.3, {}, 0.0),
               ProfilePoint(0.002, 2, 3.0, {}, 0.0)]
    assert block_losses(profile) == {0: 0.0, 1: pytest.approx(0.3), 2: pytest.approx(0.6)}
    assert block_ends(profile)[2].sigma == 0.002


# ---------------------------------------------------------------------------
# The split-first-draw estimator (ancestral sampler)


def keeps_block_0s_draw(monkeypatch, model, W_VTV):
    """Block 0 predicts W by context; every later block is certain of the token its
    state holds (the renoising noise is zero, so z is that token's embedding): the
    chain keeps block 0's draw, and the sampler's distribution is softmax(W)."""
    table_VD = model.clean_embedding_table().detach()
    monkeypatch.setattr(sampler, "standard_normal_like", lambda x, generator: torch.zeros_like(x))

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        if block == 0:
            return Denoised(z_BTD, by_context(W_VTV, tokens_BT))
        holds_BT = (z_BTD @ table_VD.T).argmax(-1)
        return Denoised(z_BTD, 50.0 * torch.nn.functional.one_hot(holds_BT, VOCAB).float())

    monkeypatch.setattr(model, "denoise", denoise)


@pytest.mark.parametrize("split_draws", [1, 2, 4])
def test_split_draws_are_exact_with_one_group_where_the_chain_keeps_block_0s_draw(monkeypatch, split_draws):
    model, data_BT, W_VTV = make_model(num_blocks=4), windows(), position_logits()
    keeps_block_0s_draw(monkeypatch, model, W_VTV)
    exact = float(-true_log_probs(by_context(W_VTV, data_BT[:, :-1]), data_BT).mean())
    config = DecodingConfig(sampler="ancestral")
    group = 2 ** split_draws
    split = sampler_heldout_ce(model, data_BT, config, chains=group, split_draws=split_draws,
                               chains_per_call=1)
    plain = sampler_heldout_ce(model, data_BT, config, chains=group)
    assert split.ce == pytest.approx(exact, abs=1e-6)
    assert [p.ce for p in split.profile] == pytest.approx([exact] * 5, abs=1e-6)
    assert split.chains == group and split.split_draws == split_draws
    assert list(split.ce_by_chains) == [group]
    assert plain.ce - exact > 2  # a few one-hot chains: many true bytes never drawn


def test_split_draws_are_capped_at_the_chains_draws(monkeypatch):
    model, data_BT, W_VTV = make_model(num_blocks=2), windows(batch=1), position_logits()
    keeps_block_0s_draw(monkeypatch, model, W_VTV)
    result = sampler_heldout_ce(model, data_BT, DecodingConfig(), chains=8, split_draws=3)
    assert result.split_draws == 2 and result.chains == 8  # two blocks, one step each
    assert sorted(result.ce_by_chains) == [4, 8]


@pytest.mark.parametrize("split_draws", [1, 2])
def test_split_draws_converge_to_the_sampler_distribution(monkeypatch, split_draws):
    """Unbiased where the later steps redraw (the two-token fake ignores what a draw
    put in z; four draws, the last never split, so z at sigma_min holds a or b): the
    same limit as the plain estimator."""
    model, data_BT = make_model(num_blocks=4), windows()
    truth = two_token_mixture(monkeypatch, model, data_BT)[-1]
    result = sampler_heldout_ce(model, data_BT, DecodingConfig(sampler="ancestral"), chains=512,
                                seed=3, chains_per_call=63, split_draws=split_draws)
    assert result.ce == pytest.approx(truth, abs=0.05)
    assert sorted(result.ce_by_chains) == [128, 256, 512]


@pytest.mark.parametrize("kwargs, message", [
    ({"config": DecodingConfig(sampler="euler"), "chains": 2}, "draws none"),
    ({"config": DecodingConfig(), "chains": 3}, "chains must be a multiple of it, got 3"),
    ({"config": DecodingConfig(), "chains": 2, "split_draws": -1}, "split_draws must be >= 0"),
])
def test_the_split_estimator_refuses_what_it_cannot_split(kwargs, message):
    kwargs = {"split_draws": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        sampler_heldout_ce(make_model(), windows(batch=1), **kwargs)


# ---------------------------------------------------------------------------
# tools/eval_sampler_ce.py


def load_eval_tool():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "tools" / "eval_sampler_ce.py"
    spec = importlib.util.spec_from_file_location("eval_sampler_ce", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ModuloTokenizer:
    def encode(self, text):
        return [ord(c) % VOCAB for c in text]


def test_the_tool_prints_the_estimate_of_the_heldout_windows_and_its_profile(tmp_path, monkeypatch, capsys):
    import json
    tool = load_eval_tool()
    model = make_model(num_blocks=4)
    monkeypatch.setattr(tool, "load_for_inference", lambda job_config, checkpoint: (model, ModuloTokenizer(), None))
    text = "".join(f"line {i} of the corpus\n" for i in range(200))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tool.main(["--job.config_file", "train_configs/llama3_debug.toml", "--checkpoint", "unused",
               "--data", str(corpus), "--ce-windows", "2", "--chains", "4", "--split-draws", "2",
               "--training.seq_len", str(SEQ - 1), "--json"])
    printed = json.loads(capsys.readouterr().out)
    heldout = text[text.rfind("\n", 0, int(len(text) * 0.9)) + 1:]
    from diffusion_blocks.eval.text import evenly_spaced_windows
    windows_BT = evenly_spaced_windows(ModuloTokenizer().encode(heldout), SEQ, 2)
    expected = sampler_heldout_ce(model, windows_BT, DecodingConfig(), chains=4, split_draws=2,
                                  chains_per_call=4)
    assert printed["ce"] == pytest.approx(expected.ce) and printed["split_draws"] == 2
    assert [p["ce"] for p in printed["profile"]] == pytest.approx([p.ce for p in expected.profile])
    assert set(printed["block_end_ce"]) == {"0", "1", "2", "3"}
    assert printed["block_loss"]["0"] == 0


def test_the_tool_refuses_a_missing_data_file_in_one_line(tmp_path):
    import subprocess, sys
    result = subprocess.run(
        [sys.executable, "tools/eval_sampler_ce.py", "--job.config_file", "train_configs/llama3_debug.toml",
         "--checkpoint", "x", "--data", str(tmp_path / "missing.txt")],
        capture_output=True, text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "missing.txt" in result.stderr.strip().splitlines()[-1]
