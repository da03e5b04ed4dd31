"""The LM quality levers of issue 10 (each a `[diffusion_blocks]` option): the weighted
block schedule, uneven layers_per_block end to end, the sampling start sigma, block 0's
log-uniform sigma law, the token-embedding init std and LR multiplier, the target
embedding scale, and one sigma per token. (Overlap: tests/test_diffusion.py.)"""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from diffusion_blocks import diffusion as dd
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.objectives import weighted_cross_entropy_sums
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.diffusion.schedules import build_block_schedule
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.models.llama3.args import DenoiserOptions
from diffusion_blocks.models.llama3.model import masked_attention
from diffusion_blocks.training_modes import check_sigma_per_token

from test_diffusion import ks_statistic
from test_llama_model import make_model, SEQ
from test_train_loop import data_of, make_trainer, run_step  # noqa: F401 (fixture)


def parse(path, *overrides):
    return parse_job_config(["--job.config_file", str(path), *overrides])


def with_options(model, **options):
    """The test model with other denoiser options (read at init_weights and forward)."""
    model.options = DenoiserOptions(**options)
    return model


# ---------------------------------------------------------------------------
# Config: every new key refuses bad values with one line naming it


@pytest.mark.parametrize(
    "text,fragments",
    [
        ('block_schedule = "weighted"\nblock_weights = [1.0, 2.0]\n', ["block_weights", "one weight per block", "num_blocks = 4"]),
        ('block_schedule = "weighted"\n', ["block_weights", "one weight per block"]),
        ('block_schedule = "weighted"\nblock_weights = [1.0, -1.0, 1.0, 1.0]\n', ["block_weights", "> 0"]),
        ('block_schedule = "weighted"\nblock_weights = [0.0, 0.0, 0.0, 0.0]\n', ["block_weights", "> 0"]),
        ('block_schedule = "weighted"\nblock_weights = [1.0, nan, 1.0, 1.0]\n', ["block_weights", "finite"]),
        ('block_schedule = "weighted"\nblock_weights = [1.0, inf, 1.0, 1.0]\n', ["block_weights", "finite"]),
        ('block_weights = [1.0, 1.0, 1.0, 1.0]\n', ["block_weights", "only by block_schedule = 'weighted'"]),
        ('block0_sigma_sampling = "uniform"\n', ["block0_sigma_sampling", "log_uniform"]),
        ('sampling_sigma_max = 100.0\n', ["sampling_sigma_max", "(sigma_min, sigma_max]"]),
        ('sampling_sigma_max = 0.001\n', ["sampling_sigma_max", "(sigma_min, sigma_max]"]),
        ('sampling_sigma_max = -3.0\n', ["sampling_sigma_max", "0 (= sigma_max)"]),
        ('target_embedding_scale = 0.0\n', ["target_embedding_scale", "> 0"]),
        ('target_embedding_scale = nan\n', ["target_embedding_scale", "finite"]),
        ('token_embedding_init_std = -0.02\n', ["token_embedding_init_std", "> 0"]),
        ('embedding_lr_multiplier = inf\n', ["embedding_lr_multiplier", "finite"]),
        ('sigma_per_token = 1\n', ["sigma_per_token", "expected bool"]),
    ],
)
def test_bad_lever_values_are_one_line_config_errors(write_toml, text, fragments):
    path = write_toml("bad.toml", "[diffusion_blocks]\n" + text)
    with pytest.raises(ConfigError) as info:
        parse(path)
    message = str(info.value)
    assert str(path.parent) in message and "\n" not in message.strip()
    for fragment in fragments:
        assert fragment in message, message


def test_lever_defaults(write_toml):
    """The measured levers stay off by default, except the token-embedding init std
    (0.02: the README's LM lever table)."""
    section = parse(write_toml("plain.toml", "[training]\nsteps = 3\n")).diffusion_blocks
    assert (section.block_schedule, section.block_weights) == ("random", [])
    assert section.block0_sigma_sampling == "lognormal" and section.sampling_sigma_max == 0
    assert DenoiserOptions.from_config(section) == DenoiserOptions(
        adaln_cond_dim=256, target_embedding_scale=1.0, sigma_per_token=False,
        token_embedding_init_std=0.02,
    )
    assert section.embedding_lr_multiplier == 1.0


# ---------------------------------------------------------------------------
# 1. The weighted block schedule


def test_weighted_schedule_frequencies_match_the_weights():
    weights = [4.0, 2.0, 1.0, 1.0]
    n = 8000
    schedule = build_block_schedule("weighted", 4, n, seed=3, weights=weights)
    blocks = [schedule.block_for_step(s) for s in range(1, n + 1)]
    counts = Counter(blocks)
    for b, w in enumerate(weights):
        # binomial standard deviation <= sqrt(0.25 / 8000) = 0.0056
        assert counts[b] / n == pytest.approx(w / sum(weights), abs=0.02), counts
    # the same seed draws the same blocks (every rank holds this generator) ...
    again = build_block_schedule("weighted", 4, n, seed=3, weights=weights)
    assert [again.block_for_step(s) for s in range(1, 201)] == blocks[:200]
    # ... and a checkpointed generator continues the sequence
    state = again.state_dict()
    tail = [again.block_for_step(s) for s in range(201, 301)]
    resumed = build_block_schedule("weighted", 4, n, seed=99, weights=weights)
    resumed.load_state_dict(state)
    assert [resumed.block_for_step(s) for s in range(201, 301)] == tail


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [0.0] * 4, [math.nan, 1.0, 1.0, 1.0]])
def test_weighted_schedule_refuses_bad_weights(weights):
    with pytest.raises(ValueError, match="block weights"):
        build_block_schedule("weighted", 4, 10, seed=0, weights=weights)


# ---------------------------------------------------------------------------
# 3a. Sampling from a start sigma below sigma_max


def test_sampling_plan_starts_at_the_start_sigma_and_skips_blocks_above_it():
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=4), 8)
    default = partition.sampling_plan(8)
    assert default == partition.sampling_plan(8, start_sigma=80.0)  # backward compatible
    assert default[0].sigma == 80.0 and partition.sampling_start_sigma == 80.0

    plan = partition.sampling_plan(8, start_sigma=3.0)
    assert plan[0].sigma == 3.0 and plan[-1].sigma_next == partition.schedule.sigma_min
    sigmas = [step.sigma for step in plan] + [plan[-1].sigma_next]
    assert sigmas == sorted(sigmas, reverse=True) and len(plan) == 8
    for step in plan:
        assert step.block == int(partition.block_of_level(torch.tensor([step.sigma])))
    # the steps are equi-probable under the log-normal truncated to [sigma_min, 3]
    masses = [dd.truncated_mass(s.sigma_next, s.sigma, partition.schedule) for s in plan]
    assert max(masses) == pytest.approx(min(masses), rel=1e-6)
    # starting on block 0's lower boundary skips block 0 entirely
    boundary = partition.interval(0)[0]
    assert {s.block for s in partition.sampling_plan(6, start_sigma=boundary)} == {1, 2, 3}


def test_configured_sampling_start_sigma_reaches_the_partition(write_toml):
    cfg = parse(write_toml("start.toml", "[diffusion_blocks]\nsampling_sigma_max = 3.0\n"))
    partition = BlockPartition.from_job_config(cfg, 8)
    assert partition.sampling_start_sigma == 3.0
    assert partition.sampling_plan(4, partition.sampling_start_sigma)[0].sigma == 3.0


# ---------------------------------------------------------------------------
# 3b. Block 0's log-uniform sigma law


def test_block0_log_uniform_law_spreads_block0_over_its_log_interval():
    n = 20_000
    lognormal = BlockPartition.from_config(DiffusionBlocks(num_blocks=4), 8)
    uniform = BlockPartition.from_config(
        DiffusionBlocks(num_blocks=4, block0_sigma_sampling="log_uniform"), 8
    )
    lo, hi = uniform.training_interval(0)
    sigma = uniform.sample_training_levels(0, n, torch.Generator().manual_seed(0))
    assert float(sigma.min()) >= lo and float(sigma.max()) <= hi

    def log_uniform_cdf(x):
        return torch.log(x / lo) / math.log(hi / lo)

    assert ks_statistic(sigma, log_uniform_cdf) < 1.95 / math.sqrt(n)
    share_above_3 = float((sigma > 3).double().mean())
    assert share_above_3 == pytest.approx(math.log(hi / 3) / math.log(hi / lo), abs=0.015)
    before = lognormal.sample_training_levels(0, n, torch.Generator().manual_seed(0))
    assert float((before > 3).double().mean()) < 0.1  # the log-normal's ~7%
    # other blocks and the validation reference keep the log-normal, draw for draw
    for block in (1, 3):
        assert torch.equal(
            uniform.sample_training_levels(block, 100, torch.Generator().manual_seed(1)),
            lognormal.sample_training_levels(block, 100, torch.Generator().manual_seed(1)),
        )
    assert torch.equal(
        uniform.sample_reference_levels(0, 100, torch.Generator().manual_seed(2)),
        lognormal.sample_training_levels(0, 100, torch.Generator().manual_seed(2)),
    )


def test_training_sigmas_come_in_the_requested_shape():
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=4), 8)
    flat = partition.sample_training_levels(2, 6, torch.Generator().manual_seed(0))
    grid = partition.sample_training_levels(2, (2, 3), torch.Generator().manual_seed(0))
    assert grid.shape == (2, 3) and torch.equal(grid.flatten(), flat)


# ---------------------------------------------------------------------------
# 4. Token-embedding init std (model level; the config path: the trainer test below)


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_token_embedding_init_std(std):
    model = with_options(make_model(), token_embedding_init_std=std)
    model.init_weights()
    weight = model.tok_embeddings.weight
    assert float(weight.std()) == pytest.approx(std, rel=0.05)
    assert float(weight.mean()) == pytest.approx(0.0, abs=0.05 * std)


# ---------------------------------------------------------------------------
# 5. The target embedding scale: one definition of a token's clean point


def test_target_embedding_scale_sets_the_norm_of_every_clean_point():
    model = with_options(make_model(), target_embedding_scale=8.0)
    tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(0))
    norms = model.clean_embedding(tokens).norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 8.0), rtol=1e-5)
    table = model.clean_embedding_table()
    assert torch.allclose(table[tokens], model.clean_embedding(tokens))
    assert model.initial_noise_std(80.0) == pytest.approx(math.sqrt(64 + 80**2))
    # the training target is that clean point: forward == denoise(y + sigma * noise)
    labels = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, SEQ, 64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.05, 2.0])
    with torch.no_grad():
        trained = model(tokens, labels, block=1, sigma_B=sigma, noise_BTD=noise)
        z = 8.0 * F.normalize(model.tok_embeddings(labels), dim=-1) + sigma[:, None, None] * noise
        assert torch.allclose(trained, model.denoise(tokens, z, sigma, 1).logits_BTV, atol=1e-5)
        # and the clean rows are scaled too: the first layer sees norm-8 clean rows
        seen = {}
        handle = model.layers["0"].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
        model.denoise(tokens, z, sigma, 0)
        handle.remove()
    clean_norms = seen["x"][:, :SEQ].norm(dim=-1)
    assert torch.allclose(clean_norms, torch.full_like(clean_norms, 8.0), rtol=1e-5)


# ---------------------------------------------------------------------------
# 6. One sigma per token


def per_row_condition(model, tokens, z, sigma, block=0):
    """The condition vectors the first layer of `block` receives, (B, 2T, C) or (B, C)."""
    seen = {}
    layer = model.layers[str(model.partition.layer_ranges[block][0])]
    handle = layer.adaln.register_forward_pre_hook(lambda m, a: seen.update(cond=a[0]))
    try:
        out = model.denoise(tokens, z, sigma, block)
    finally:
        handle.remove()
    return seen["cond"], out


@torch.no_grad()
def test_per_token_sigma_conditions_each_noisy_row_on_its_own_sigma():
    model = with_options(make_model(), sigma_per_token=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    z = torch.randn(2, SEQ, 64, generator=gen)
    sigma = torch.full((2, SEQ), 1.0)
    sigma[0, 3] = 20.0
    cond, out = per_row_condition(model, tokens, z, sigma)
    assert cond.shape[:2] == (2, 2 * SEQ)
    assert not torch.any(cond[:, :SEQ])  # clean rows: the zero condition
    noisy = cond[:, SEQ:]
    assert not torch.allclose(noisy[0, 3], noisy[0, 4])  # two rows, two sigmas
    assert torch.equal(noisy[0, 4], noisy[0, 5]) and torch.equal(noisy[0, 4], noisy[1, 3])
    # row 3 alone changed: the other rows' outputs are those of the all-1.0 sigma
    _, same = per_row_condition(model, tokens, z, torch.full((2, SEQ), 1.0))
    others = [j for j in range(SEQ) if j != 3]
    assert torch.allclose(out.logits_BTV[0, others], same.logits_BTV[0, others], atol=1e-5)
    assert not torch.allclose(out.logits_BTV[0, 3], same.logits_BTV[0, 3], atol=1e-3)
    # a per-sequence sigma (the sampler's, the validator's) applies to every row
    _, expanded = per_row_condition(model, tokens, z, torch.tensor([1.0, 1.0]))
    assert torch.equal(expanded.logits_BTV, same.logits_BTV)


def test_per_token_loss_weights_each_token_by_its_own_sigma():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]])  # (1, 2, 3)
    labels = torch.tensor([[0, 2]])
    sigma = torch.tensor([[0.1, 4.0]])
    sums = weighted_cross_entropy_sums(logits, labels, sigma, sigma_data=0.5)

    def ce(row, label):
        return -(row[label] - torch.logsumexp(row, 0))

    def w(s):
        return (s**2 + 0.25) / (s * 0.5) ** 2

    ce0, ce1 = ce(logits[0, 0], 0), ce(logits[0, 1], 2)
    assert float(sums.loss_sum) == pytest.approx(float(w(0.1) * ce0 + w(4.0) * ce1), rel=1e-6)
    assert float(sums.unweighted_sum) == pytest.approx(float(ce0 + ce1), rel=1e-6)
    # per sequence: one weight for the whole row, as before
    per_sequence = weighted_cross_entropy_sums(logits, labels, torch.tensor([4.0]), 0.5)
    assert float(per_sequence.loss_sum) == pytest.approx(float(w(4.0) * (ce0 + ce1)), rel=1e-6)


def test_per_row_sigma_without_sigma_per_token_is_refused():
    model = make_model()
    with pytest.raises(ValueError, match="sigma_per_token"):
        model.denoise(torch.zeros(1, SEQ, dtype=torch.long), torch.zeros(1, SEQ, 64),
                      torch.ones(1, SEQ), 0)


def test_sigma_per_token_is_refused_for_a_model_with_one_sigma_per_sample(write_toml):
    cfg = parse(write_toml("t.toml", "[diffusion_blocks]\nsigma_per_token = true\n"))
    with pytest.raises(ConfigError, match="sigma_per_token needs a token-sequence denoiser"):
        check_sigma_per_token(cfg, torch.nn.Linear(1, 1))
    check_sigma_per_token(cfg, with_options(make_model(), sigma_per_token=True))


@torch.no_grad()
def test_per_sequence_path_is_the_one_condition_per_sequence_computation():
    """The per-sequence path, spelled out from the model's parts and the EDM
    coefficients: one condition vector per sequence for all 2T rows (clean rows
    included), sigma broadcast per sequence. Bit-identical: sigma_per_token = false
    computes what the model computed before the option existed."""
    model = make_model()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    labels = torch.randint(0, 97, (2, SEQ), generator=gen)
    noise = torch.randn(2, SEQ, 64, generator=gen)
    sigma_B = torch.tensor([0.3, 7.0])
    block, sd = 0, model.partition.schedule.sigma_data

    s = sigma_B[:, None, None]
    y = F.normalize(model.tok_embeddings(labels), dim=-1)
    z = y + s * noise
    x = torch.cat([F.normalize(model.tok_embeddings(tokens), dim=-1), dd.c_in(s, sd) * z], 1)
    cond_BC = model.sigma_embedder(dd.c_noise(sigma_B))
    mask = model.attention_mask(SEQ, x.device)
    positions = torch.cat([torch.arange(SEQ), torch.arange(SEQ) + 1])[None]
    for i in model.partition.layer_ranges[block]:
        layer = model.layers[str(i)]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = layer.adaln(cond_BC)
        h = layer.attention_norm(x) * (1 + scale_a[:, None]) + shift_a[:, None]
        x = x + gate_a[:, None] * masked_attention(layer.attention, h, model.freqs_cis, mask, positions)
        h = layer.ffn_norm(x) * (1 + scale_m[:, None]) + shift_m[:, None]
        x = x + gate_m[:, None] * layer.feed_forward(h)
    out = model.norm(x[:, SEQ:])
    denoised = dd.c_skip(s, sd) * z + dd.c_out(s, sd) * out
    expected = model.output(model.final_adaln(denoised, cond_BC))

    got = model(tokens, labels, block=block, sigma_B=sigma_B, noise_BTD=noise)
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------
# Through the trainer: uneven layers_per_block, and every lever from the config


def test_uneven_layers_per_block_train_end_to_end(make_trainer):
    trainer = make_trainer("--diffusion_blocks.layers_per_block", "4", "2", "1", "1")
    model = trainer.model
    assert [list(r) for r in model.partition.layer_ranges] == [[0, 1, 2, 3], [4, 5], [6], [7]]
    ran: Counter = Counter()
    handles = [
        layer.register_forward_pre_hook(lambda *_, i=int(name): ran.update([i]))
        for name, layer in model.layers.items()
    ]
    data = data_of(trainer)
    try:
        for block in (0, 3, 1, 2):
            ran.clear()
            metrics = run_step(trainer, data, block)
            assert math.isfinite(metrics["loss"])
            assert set(ran) == set(model.partition.layer_ranges[block])
            with_grad = {
                int(n.split(".")[1]) for n, p in model.named_parameters()
                if n.startswith("layers.") and p.grad is not None
            }
            assert with_grad == set(model.partition.layer_ranges[block])
    finally:
        for handle in handles:
            handle.remove()
    assert trainer.block_stats.steps == [1, 1, 1, 1]


def test_levers_from_the_config_reach_the_model_optimizer_and_steps(make_trainer, monkeypatch):
    trainer = make_trainer(
        "--diffusion_blocks.block_schedule", "weighted",
        "--diffusion_blocks.block_weights", "3", "1", "1", "1",
        "--diffusion_blocks.sigma_per_token",
        "--diffusion_blocks.target_embedding_scale", "8",
        "--diffusion_blocks.token_embedding_init_std", "0.02",
        "--diffusion_blocks.embedding_lr_multiplier", "10",
        "--lr_scheduler.warmup_steps", "4",
    )
    model = trainer.model
    assert model.options == DenoiserOptions(256, 8.0, True, 0.02)
    assert trainer.block_schedule.probabilities.tolist() == [0.5, 1 / 6, 1 / 6, 1 / 6]
    assert float(model.tok_embeddings.weight.std()) == pytest.approx(0.02, rel=0.05)

    # the embeddings have a param group of their own; every parameter is in one group
    (optimizer,) = list(trainer.optimizers)
    base, embedding = optimizer.param_groups
    assert embedding["params"] == [model.tok_embeddings.weight]
    assert len(base["params"]) + 1 == len(list(model.parameters()))
    data = data_of(trainer)
    sigma_shapes = []
    original_loss = trainer.family.task.denoiser_loss

    def denoiser_loss(model, inputs, labels, block, sigma, generator):
        sigma_shapes.append((tuple(sigma.shape), tuple(labels.shape)))
        return original_loss(model, inputs, labels, block, sigma, generator)

    monkeypatch.setattr(trainer.family.task, "denoiser_loss", denoiser_loss)
    lrs = []
    for block in (0, 2):  # warmup: the LR changes every step
        metrics = run_step(trainer, data, block)
        assert math.isfinite(metrics["loss"])
        lrs.append([g["lr"] for g in optimizer.param_groups])
    # LambdaLR scales each group's own initial lr: the ratio holds after every step
    assert lrs[0][0] != lrs[1][0]
    for base_lr, embedding_lr in lrs:
        assert embedding_lr == pytest.approx(10 * base_lr, rel=1e-12)
    # one sigma per label token
    assert all(s == labels for s, labels in sigma_shapes)

    # the groups survive torchtitan's flattened optimizer state dict (checkpoints)
    state = trainer.optimizers.state_dict()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    trainer.optimizers.load_state_dict(state)
    assert [g["lr"] for g in optimizer.param_groups] == lrs[-1]


def test_default_trainer_keeps_one_param_group_and_the_official_embedding_init(make_trainer):
    trainer = make_trainer()
    (optimizer,) = list(trainer.optimizers)
    assert len(optimizer.param_groups) == 1
    assert float(trainer.model.tok_embeddings.weight.std()) == pytest.approx(0.02, rel=0.05)
    torchtitans = make_trainer("--diffusion_blocks.token_embedding_init_std", "1.0")
    assert float(torchtitans.model.tok_embeddings.weight.std()) == pytest.approx(1.0, rel=0.05)
    assert type(trainer.block_schedule).__name__ == "RandomSchedule"
    assert trainer.mode.level_shape(torch.zeros(2, 5)) == (2,)
