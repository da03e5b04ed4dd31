"""Heun (EDM's second-order step, Karras et al. 2022, Algorithm 1) as a sampler option:
the step against its equation written out by hand, its accuracy against Euler's, the
block that runs its second evaluation (the owner of sigma_next), and the number of
network evaluations, for the DiT, the ViT, the LM and the recurrent LM."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from diffusion_blocks import diffusion as dd
from diffusion_blocks.config.checks import check_diffusion_blocks
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.sampling import euler_sample, heun_sample, network_evaluations
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, forwards_per_token, generate, owner_of,
)
from diffusion_blocks.registry import resolve_run_spec
from test_lm_sampler import normalised_table, one_hot_logits, prompt, record_denoise
from test_llama_model import make_model, SEQ
from vision_helpers import build_on_cpu, job_config, LayerCallRecorder

SCHEDULE = dd.NoiseSchedule()


def plan_of(num_blocks: int, steps_per_block: int) -> list[dd.EulerStep]:
    boundaries = dd.block_sigma_boundaries(num_blocks, SCHEDULE)
    return dd.sampling_plan(num_blocks * steps_per_block, boundaries, SCHEDULE)


class LinearBlocks:
    """A fake block-wise denoiser: block b's D(z, sigma) = a_b z; records every call."""

    def __init__(self, slopes: list[float]):
        self.slopes, self.calls = slopes, []

    def __call__(self, z, sigma, block):
        self.calls.append((sigma, block))
        return self.slopes[block] * z


def heun_by_hand(z: float, sigma: float, sigma_next: float, a_now: float, a_next: float) -> float:
    """Algorithm 1 with D(z, s) = a_now z at sigma and a_next z at sigma_next."""
    d = (z - a_now * z) / sigma
    z_euler = z + (sigma_next - sigma) * d
    d_next = (z_euler - a_next * z_euler) / sigma_next
    return z + (sigma_next - sigma) * (d + d_next) / 2


# ---------------------------------------------------------------------------
# The step


def test_heun_step_is_the_documented_form():
    # d = (1 - 1/4) 1 / 2 = 3/8; z' = 1 - 3/2 * 3/8 = 7/16; d' = 3/4 * 7/16 / (1/2) = 21/32;
    # z_next = 1 - 3/2 (3/8 + 21/32) / 2 = 29/128 (all exact in binary)
    z = torch.tensor([1.0])
    seen = []

    def denoise_next(z_euler):
        seen.append(z_euler.clone())
        return 0.25 * z_euler

    z_next = dd.heun_step(z, 0.25 * z, 2.0, 0.5, denoise_next)
    assert seen == [torch.tensor([7 / 16])]  # D(z', sigma_next) is asked at the Euler point
    assert z_next.item() == 29 / 128


def test_a_step_to_sigma_zero_is_euler_with_one_evaluation():
    z = torch.tensor([3.0])

    def denoise_next(z_euler):
        raise AssertionError("no second evaluation at sigma_next = 0")

    assert torch.equal(dd.heun_step(z, 0.5 * z, 2.0, 0.0, denoise_next), dd.euler_step(z, 0.5 * z, 2.0, 0.0))
    step = dd.EulerStep(2.0, 0.0, 0, 0)
    assert network_evaluations("heun", [step]) == 1


@pytest.mark.parametrize("num_blocks", [2, 4])
def test_one_step_per_block_reduces_to_the_documented_form(num_blocks):
    """One Heun step per block: the grid is the block boundaries, block k steps from its
    top to its bottom and block k + 1 (the owner of that boundary; the last block at
    sigma_min) evaluates the end."""
    slopes = [0.1 * (b + 1) for b in range(num_blocks)]  # a different D per block
    boundaries = dd.block_sigma_boundaries(num_blocks, SCHEDULE)[::-1]  # descending
    denoiser = LinearBlocks(slopes)
    z = heun_sample(denoiser, torch.tensor([1.5], dtype=torch.float64), plan_of(num_blocks, 1))
    expected = 1.5
    for k in range(num_blocks):
        next_block = min(k + 1, num_blocks - 1)
        expected = heun_by_hand(expected, boundaries[k], boundaries[k + 1], slopes[k], slopes[next_block])
    assert z.item() == pytest.approx(expected, rel=1e-12)
    assert denoiser.calls == [
        call for k in range(num_blocks)
        for call in ((boundaries[k], k), (boundaries[k + 1], min(k + 1, num_blocks - 1)))
    ]


# ---------------------------------------------------------------------------
# Accuracy


def test_heun_is_exact_where_the_slope_is_linear_in_sigma_and_euler_is_not():
    """D(z, s) = z - s (alpha + beta s): dz/ds = alpha + beta s, z(s) = z0 + alpha (s - s0)
    + beta (s^2 - s0^2) / 2. The trapezoid rule (Heun) integrates it exactly on any
    grid; Euler falls short by beta (s' - s)^2 / 2 per step."""
    alpha, beta, z0 = 0.3, 0.05, 2.0

    def denoise(z, sigma, block):
        return z - sigma * (alpha + beta * sigma)

    plan = plan_of(2, 3)
    start, end = plan[0].sigma, plan[-1].sigma_next
    exact = z0 + alpha * (end - start) + beta * (end**2 - start**2) / 2
    z_start = torch.tensor([z0], dtype=torch.float64)
    heun, euler = heun_sample(denoise, z_start, plan).item(), euler_sample(denoise, z_start, plan).item()
    assert heun == pytest.approx(exact, rel=1e-12, abs=1e-9)
    euler_miss = sum(beta * (s.sigma_next - s.sigma) ** 2 / 2 for s in plan)
    assert exact - euler == pytest.approx(euler_miss, rel=1e-9)
    assert abs(euler - exact) > 1.0


def test_heun_converges_at_second_order_and_euler_at_first():
    """Gaussian data N(0, sd^2): D(z, s) = sd^2 / (sd^2 + s^2) z, exact solution
    z(s) = z0 sqrt((sd^2 + s^2) / (sd^2 + s0^2)). Uniform grids from 2 to 0.1: halving the
    step divides Heun's error by ~4 and Euler's by ~2; Heun beats Euler at equal NFE."""
    sd, start, end, z0 = 0.5, 2.0, 0.1, 1.0

    def denoise(z, sigma, block):
        return sd**2 / (sd**2 + sigma**2) * z

    def error(sample, num_steps):
        grid = torch.linspace(start, end, num_steps + 1, dtype=torch.float64).tolist()
        plan = [dd.EulerStep(a, b, 0, 0) for a, b in zip(grid, grid[1:])]
        z = sample(denoise, torch.tensor([z0], dtype=torch.float64), plan).item()
        return abs(z - z0 * ((sd**2 + end**2) / (sd**2 + start**2)) ** 0.5)

    assert error(heun_sample, 16) / error(heun_sample, 32) == pytest.approx(4, rel=0.1)
    assert error(euler_sample, 16) / error(euler_sample, 32) == pytest.approx(2, rel=0.1)
    for nfe in (8, 16, 32):
        assert error(heun_sample, nfe // 2) < error(euler_sample, nfe)


# ---------------------------------------------------------------------------
# Which block evaluates, and how often


@pytest.mark.parametrize("num_blocks,steps_per_block", [(2, 1), (4, 1), (4, 3)])
def test_the_second_evaluation_runs_the_block_owning_sigma_next(num_blocks, steps_per_block):
    plan = plan_of(num_blocks, steps_per_block)
    boundaries = dd.block_sigma_boundaries(num_blocks, SCHEDULE)
    denoiser = LinearBlocks([0.5] * num_blocks)
    heun_sample(denoiser, torch.ones(3), plan)
    assert denoiser.calls == [c for s in plan for c in ((s.sigma, s.block), (s.sigma_next, s.next_block))]
    for sigma, block in denoiser.calls:  # every evaluation by the owner of its sigma
        assert block == int(dd.block_of_sigma(torch.tensor([sigma]), boundaries))
    # at a block boundary the second evaluation is the next block's, and it is that
    # block's first call; every block is asked, each one in order
    crossings = [s for s in plan if s.next_block != s.block]
    assert [(s.block, s.next_block) for s in crossings] == [(b, b + 1) for b in range(num_blocks - 1)]
    assert plan[-1].next_block == num_blocks - 1 and plan[-1].sigma_next == SCHEDULE.sigma_min
    per_block = [sum(1 for _, b in denoiser.calls if b == block) for block in range(num_blocks)]
    assert per_block == [2 * steps_per_block + (block > 0) - (block < num_blocks - 1)
                         for block in range(num_blocks)]
    assert network_evaluations("heun", plan) == len(denoiser.calls) == 2 * len(plan)
    assert network_evaluations("euler", plan) == len(plan)


@pytest.mark.parametrize("config,num_steps", [("dit_digits.toml", 6), ("dit_digits_e2e.toml", 3)])
def test_dit_heun_runs_each_evaluation_in_the_block_owning_its_sigma(config, num_steps):
    model, _ = build_on_cpu(config, "--diffusion_blocks.num_blocks", "4")
    recorder = LayerCallRecorder(model)
    classes = torch.tensor([0, 9])
    images = model.sample(classes, num_steps, 2.0, torch.Generator().manual_seed(0), "heun")
    recorder.remove()
    plan = model.partition.sampling_plan(num_steps)
    ranges = model.partition.layer_ranges
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert recorder.calls == [list(ranges[b]) for s in plan for b in (s.block, s.next_block)]
    assert len(recorder.calls) == network_evaluations("heun", plan) == 2 * num_steps
    euler = model.sample(classes, num_steps, 2.0, torch.Generator().manual_seed(0), "euler")
    assert not torch.allclose(images, euler)


def test_dit_sampler_key_reaches_the_training_samples_and_is_checked():
    assert check_diffusion_blocks(DiffusionBlocks(sampler="heun")) == []
    assert ("sampler", "'rk4' is not one of ['euler', 'heun']") in check_diffusion_blocks(
        DiffusionBlocks(sampler="rk4"))
    with pytest.raises(ConfigError, match=r"sampler.*not one of"):
        job_config("dit_digits.toml", "--diffusion_blocks.sampler", "rk4")


def test_vit_heun_classifies_with_two_evaluations_per_step_and_the_final_read():
    model, _ = build_on_cpu(
        "vit_digits.toml", "--diffusion_blocks.sampling_steps_per_block", "2",
        "--diffusion_blocks.sampler", "heun",
    )
    assert model.sampler == "heun"
    recorder = LayerCallRecorder(model)
    logits = model.classify(torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    recorder.remove()
    plan = model.partition.sampling_plan(model.partition.num_blocks * 2)
    ranges = model.partition.layer_ranges
    expected = [list(ranges[b]) for s in plan for b in (s.block, s.next_block)]
    expected.append(list(ranges[-1]))  # the final logits at sigma_min
    assert logits.shape == (4, 10) and recorder.calls == expected
    assert [s.next_block for s in plan] == [0, 1, 1, 1]


def test_text_families_refuse_the_vision_sampler_key():
    for config in ("llama3_debug.toml", "recurrent_debug.toml", "md4_chars.toml"):
        with pytest.raises(ConfigError, match=r"sampler = 'heun' is not read by"):
            resolve_run_spec(job_config(config, "--diffusion_blocks.sampler", "heun"))


# ---------------------------------------------------------------------------
# The LMs: D = softmax(logits) @ normalised table at both evaluations


def test_lm_heun_token_step_is_the_documented_form_with_the_owner_of_sigma_next(monkeypatch):
    """One-hot logits of token 3 + block: D at sigma is block b's token embedding, D at
    sigma_next the next block's; each step's state follows Algorithm 1 by hand."""
    model = make_model(num_blocks=2)
    vocab = model.tok_embeddings.weight.shape[0]
    table_VD = normalised_table(model)
    calls = record_denoise(monkeypatch, model, lambda sigma, block, batch: one_hot_logits(3 + block, vocab, batch))
    config = DecodingConfig(max_new_tokens=1, steps_per_block=2, sampler="heun")
    generate(model, prompt(), config, SEQ)
    plan = model.partition.sampling_plan(4)
    assert len(calls) == 2 * len(plan) + 1 == forwards_per_token(model, config)
    sigma_min = model.partition.schedule.sigma_min
    assert [c.sigma for c in calls] == pytest.approx(
        [x for s in plan for x in (s.sigma, s.sigma_next)] + [sigma_min])
    assert [c.block for c in calls] == (
        [b for s in plan for b in (s.block, s.next_block)] + [owner_of(model.partition, sigma_min)])
    for k, step in enumerate(plan):
        first, second, after = calls[2 * k], calls[2 * k + 1], calls[2 * k + 2]
        d = (first.z_BD - table_VD[3 + step.block]) / step.sigma
        z_euler = first.z_BD + (step.sigma_next - step.sigma) * d
        torch.testing.assert_close(second.z_BD, z_euler, atol=1e-4, rtol=1e-5)
        d_next = (z_euler - table_VD[3 + step.next_block]) / step.sigma_next
        z_next = first.z_BD + (step.sigma_next - step.sigma) * (d + d_next) / 2
        torch.testing.assert_close(after.z_BD, z_next, atol=1e-4, rtol=1e-5)
    assert [s.next_block for s in plan] == [0, 1, 1, 1]


def test_lm_forwards_per_token_counts_two_calls_per_heun_step():
    model = make_model(num_blocks=2)
    for sampler, per_step in (("euler", 1), ("ancestral", 1), ("heun", 2)):
        config = DecodingConfig(steps_per_block=3, sampler=sampler)
        assert forwards_per_token(model, config) == 2 * 3 * per_step + 1


def test_recurrent_heun_runs_the_core_twice_per_step():
    from diffusion_blocks.models.recurrent import sampler
    from test_recurrent import build, calls_per_part, count_layer_calls, tokens

    model = build().eval()
    context = tokens(1, 6)
    logits = {}
    for token_sampler, passes in (("euler", 3), ("heun", 6)):
        with count_layer_calls(model) as counts:
            logits[token_sampler] = sampler.next_token_logits(
                model, context, 3, torch.Generator().manual_seed(0), token_sampler=token_sampler
            )
        assert calls_per_part(model, counts)["core"] == {passes}
    assert torch.isfinite(logits["heun"]).all() and not torch.allclose(logits["heun"], logits["euler"])


# ---------------------------------------------------------------------------
# The tools' flags


def test_a_bad_sampler_flag_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sample_images.py"), "--job.config_file",
         str(REPO / "train_configs" / "dit_digits.toml"), "--checkpoint", str(tmp_path),
         "--sampler", "rk4"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --sampler: invalid choice: 'rk4'" in result.stderr.strip().splitlines()[-1]
