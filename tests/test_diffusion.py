import math

import pytest
import torch
from torchtitan.components.loss import IGNORE_INDEX

from diffusion_blocks import diffusion as dd
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.objectives import (
    weighted_cross_entropy_sums,
    weighted_squared_error_sums,
)
from diffusion_blocks.diffusion.partition import BlockPartition

SCHEDULE = dd.NoiseSchedule()

REFERENCE_BOUNDARIES = {
    2: [0.002, 0.3012, 80],
    3: [0.002, 0.1796, 0.5050, 80],
    4: [0.002, 0.1341, 0.3012, 0.6766, 80],
}


def significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_equiprobable_boundaries_match_reference(num_blocks):
    got = dd.equiprobable_boundaries(num_blocks, SCHEDULE)
    assert [significant(b) for b in got] == pytest.approx(REFERENCE_BOUNDARIES[num_blocks])


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 5, 8])
def test_every_equiprobable_interval_holds_one_over_b(num_blocks):
    bounds = dd.equiprobable_boundaries(num_blocks, SCHEDULE)
    masses = [dd.truncated_mass(lo, hi, SCHEDULE) for lo, hi in zip(bounds, bounds[1:])]
    assert masses == pytest.approx([1 / num_blocks] * num_blocks, abs=1e-12)


def test_uniform_log_boundaries_have_equal_log_widths_and_unequal_mass():
    bounds = dd.uniform_log_boundaries(4, SCHEDULE)
    widths = [math.log(hi / lo) for lo, hi in zip(bounds, bounds[1:])]
    assert widths == pytest.approx([widths[0]] * 4)
    masses = [dd.truncated_mass(lo, hi, SCHEDULE) for lo, hi in zip(bounds, bounds[1:])]
    assert max(masses) - min(masses) > 0.1


def test_block_order_is_reversed_and_owner_map_agrees():
    bounds = dd.equiprobable_boundaries(3, SCHEDULE)
    assert dd.block_interval(0, bounds) == (bounds[2], bounds[3])  # highest noise
    assert dd.block_interval(2, bounds) == (bounds[0], bounds[1])
    sigma = torch.tensor(
        [80.0, 1.0, bounds[2], 0.3, bounds[1], 0.01, 0.002], dtype=torch.float64
    )
    assert dd.block_of_sigma(sigma, bounds).tolist() == [0, 0, 1, 1, 2, 2, 2]


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(samples.double())
    n = x.numel()
    f = cdf(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lower = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(upper, lower).max())


def global_truncated_cdf(sigma: torch.Tensor) -> torch.Tensor:
    q = torch.special.ndtr((torch.log(sigma) - SCHEDULE.p_mean) / SCHEDULE.p_std)
    q_min = dd.lognormal_cdf(SCHEDULE.sigma_min, SCHEDULE)
    q_max = dd.lognormal_cdf(SCHEDULE.sigma_max, SCHEDULE)
    return (q - q_min) / (q_max - q_min)


def draw_via_blocks(partition_name: str, num_blocks: int, n: int) -> torch.Tensor:
    section = DiffusionBlocks(num_blocks=num_blocks, overlap=0.0, partition=partition_name)
    partition = BlockPartition.from_config(section, num_blocks)
    gen = torch.Generator().manual_seed(1234)
    blocks = torch.randint(0, num_blocks, (n,), generator=gen)
    counts = torch.bincount(blocks, minlength=num_blocks)
    return torch.cat(
        [partition.sample_training_levels(b, int(counts[b]), gen) for b in range(num_blocks)]
    )


N_DRAWS = 40_000
KS_CRITICAL_0_001 = 1.95 / math.sqrt(N_DRAWS)


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
def test_uniform_block_choice_reproduces_global_lognormal(num_blocks):
    samples = draw_via_blocks("equiprobable", num_blocks, N_DRAWS)
    assert ks_statistic(samples, global_truncated_cdf) < KS_CRITICAL_0_001


def test_ks_check_rejects_the_uniform_log_partition():
    # negative control: the same procedure on unequal-mass intervals is detected
    samples = draw_via_blocks("uniform_log", 4, N_DRAWS)
    assert ks_statistic(samples, global_truncated_cdf) > 10 * KS_CRITICAL_0_001


def test_block_sampling_stays_inside_widened_interval():
    gen = torch.Generator().manual_seed(0)
    bounds = dd.equiprobable_boundaries(4, SCHEDULE)
    for block in range(4):
        lo, hi = dd.block_training_interval(block, bounds, 0.1, SCHEDULE)
        sigma = dd.sample_sigma(5000, lo, hi, SCHEDULE, gen)
        assert float(sigma.min()) >= lo and float(sigma.max()) <= hi


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("overlap", [0.0, 0.05, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("partition", ["equiprobable", "uniform_log"])
def test_overlap_never_leaves_global_range(num_blocks, overlap, partition):
    bounds = dd.block_sigma_boundaries(num_blocks, SCHEDULE, partition)
    for block in range(num_blocks):
        lo, hi = dd.block_interval(block, bounds)
        wlo, whi = dd.block_training_interval(block, bounds, overlap, SCHEDULE)
        assert SCHEDULE.sigma_min <= wlo <= lo and hi <= whi <= SCHEDULE.sigma_max


def test_overlap_widens_by_gamma_log_width():
    lo, hi = 0.1, 1.0
    wlo, whi = dd.widen_interval(lo, hi, 0.1, SCHEDULE)
    r = math.log(hi / lo)
    assert math.log(lo / wlo) == pytest.approx(0.1 * r)
    assert math.log(whi / hi) == pytest.approx(0.1 * r)


def test_preconditioning_identities():
    sigma = torch.logspace(-2.7, 1.9, 50, dtype=torch.float64)
    sd = SCHEDULE.sigma_data
    # EDM: c_skip + c_out^2 / sd^2 = 1 and w = 1 / c_out^2
    assert torch.allclose(dd.c_skip(sigma, sd) + dd.c_out(sigma, sd) ** 2 / sd**2,
                          torch.ones_like(sigma))
    assert torch.allclose(dd.loss_weight(sigma, sd), 1 / dd.c_out(sigma, sd) ** 2)
    assert torch.allclose(dd.c_in(sigma, sd), 1 / torch.sqrt(sigma**2 + sd**2))
    assert torch.allclose(dd.c_noise(sigma), torch.log(sigma) / 4)
    # w spans about five orders of magnitude over the range
    w = dd.loss_weight(torch.tensor([0.002, 80.0], dtype=torch.float64), sd)
    assert float(w[0]) == pytest.approx(2.5e5, rel=1e-3)


def test_loss_weight_known_values():
    # docs/method.md section 4: w = (s^2 + sd^2) / (s sd)^2, i.e. 1 / s^2 + 1 / sd^2
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    assert dd.loss_weight(sigma, 0.5).tolist() == pytest.approx(
        [250004.0, 104.0, 8.0, 5.0, 4.00015625], rel=1e-12)
    assert dd.loss_weight(sigma, 1.0).tolist() == pytest.approx(
        [250001.0, 101.0, 5.0, 2.0, 1.00015625], rel=1e-12)


def test_weighted_cross_entropy_sums_on_a_hand_computed_batch():
    # 2 samples x 2 positions, 2 classes; sigma 0.5 and 1.0 give w = 8 and 5 (sd = 0.5)
    ln3 = math.log(3.0)
    logits = torch.tensor([[[0.0, 0.0], [ln3, 0.0]],
                           [[0.0, ln3], [5.0, -5.0]]])
    labels = torch.tensor([[0, 0], [0, IGNORE_INDEX]])  # the last position is padding
    sums = weighted_cross_entropy_sums(logits, labels, torch.tensor([0.5, 1.0]), 0.5)
    # CE: ln 2, ln(4/3) (p = 3/4), ln 4 (p = 1/4); the ignored position counts nowhere
    assert int(sums.num_items) == 3
    assert float(sums.unweighted_sum) == pytest.approx(math.log(2) + math.log(4 / 3) + math.log(4))
    assert float(sums.loss_sum) == pytest.approx(8 * (math.log(2) + math.log(4 / 3)) + 5 * math.log(4))


def test_weighted_squared_error_sums_on_a_hand_computed_batch():
    denoised = torch.tensor([[1.0, 3.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    target = torch.tensor([[0.0, 1.0], [2.0, 0.0]]).view(2, 1, 1, 2)
    sums = weighted_squared_error_sums(denoised, target, torch.tensor([0.5, 1.0]), 0.5)
    # per-image mean squared error 2.5 and 2.0; weights 8 and 5
    assert int(sums.num_items) == 2
    assert float(sums.unweighted_sum) == pytest.approx(4.5)
    assert float(sums.loss_sum) == pytest.approx(8 * 2.5 + 5 * 2.0)


def test_euler_step_moves_toward_the_denoised_estimate():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(16, 8, generator=gen)
    eps = torch.randn(16, 8, generator=gen)
    sigma, sigma_next = 2.0, 0.5
    z = y + sigma * eps
    z_next = dd.euler_step(z, y, sigma, sigma_next)
    # with a perfect denoiser the ODE step is exact: the noise shrinks to sigma_next
    assert torch.allclose(z_next, y + sigma_next * eps, atol=1e-6)
    assert (z_next - y).norm() < (z - y).norm()


def test_sampling_grid_descends_with_both_ends_and_equal_mass():
    grid = dd.sampling_sigmas(6, SCHEDULE)
    assert grid[0] == SCHEDULE.sigma_max and grid[-1] == SCHEDULE.sigma_min
    assert all(a > b for a, b in zip(grid, grid[1:]))
    masses = [dd.truncated_mass(b, a, SCHEDULE) for a, b in zip(grid, grid[1:])]
    assert masses == pytest.approx([1 / 6] * 6)


@pytest.mark.parametrize("num_blocks,num_steps", [(3, 3), (3, 6), (4, 4), (3, 50), (4, 10)])
def test_sampling_plan_runs_blocks_in_order_owning_their_sigma(num_blocks, num_steps):
    bounds = dd.equiprobable_boundaries(num_blocks, SCHEDULE)
    plan = dd.sampling_plan(num_steps, bounds, SCHEDULE)
    assert [s.block for s in plan] == sorted(s.block for s in plan)
    assert plan[0].block == 0 and plan[-1].block == num_blocks - 1
    for step in plan:
        lo, hi = dd.block_interval(step.block, bounds)
        assert lo < step.sigma <= hi
    if num_steps % num_blocks == 0:
        per_block = [sum(s.block == b for s in plan) for b in range(num_blocks)]
        assert per_block == [num_steps // num_blocks] * num_blocks


# ---------------------------------------------------------------------------
# partition = "explicit" and the information-balanced cut


def test_explicit_partition_cuts_at_the_given_sigmas():
    from diffusion_blocks.diffusion.partition import EXPLICIT

    section = DiffusionBlocks(num_blocks=4, partition=EXPLICIT, sigma_boundaries=[0.05, 0.5, 5.0])
    partition = BlockPartition.from_config(section, n_layers=8)
    assert partition.boundaries == (0.002, 0.05, 0.5, 5.0, 80.0)
    assert [partition.interval(b) for b in range(4)][0] == (5.0, 80.0)  # block 0 owns the top


@pytest.mark.parametrize("inner, fragment", [
    ([0.5, 5.0], "has 2 values; partition = 'explicit' with num_blocks = 4 needs 3"),
    ([5.0, 0.5, 0.05], "must be strictly ascending"),
    ([0.05, 0.5, 90.0], "must be strictly ascending inside (sigma_min, sigma_max) = (0.002, 80)"),
])
def test_explicit_partition_refuses_boundaries_that_do_not_cut_the_range(inner, fragment):
    section = DiffusionBlocks(num_blocks=4, partition="explicit", sigma_boundaries=inner)
    with pytest.raises(ValueError) as info:
        BlockPartition.from_config(section, n_layers=8)
    assert fragment in str(info.value)


def test_sigma_boundaries_act_only_with_the_explicit_partition():
    from diffusion_blocks.config.checks import check_diffusion_blocks

    assert ("sigma_boundaries", ) == tuple(k for k, _ in check_diffusion_blocks(
        DiffusionBlocks(sigma_boundaries=[0.1, 1.0, 10.0])))
    assert [k for k, _ in check_diffusion_blocks(DiffusionBlocks(partition="explicit"))] == ["partition"]
    assert not check_diffusion_blocks(DiffusionBlocks(partition="explicit", sigma_boundaries=[0.1, 1.0, 10.0]))


def test_information_balanced_cut_gives_each_block_an_equal_share_of_the_ce_drop():
    """A profile linear in ln(sigma) over [e^-4, e^4] (CE 4 at the top, 0 at the
    bottom): the equal-drop cut is the equal cut in ln(sigma). A profile flat above
    sigma = 1 puts every boundary below it."""
    from diffusion_blocks.diffusion.partition import information_balanced_boundaries

    log_s = [x / 2 for x in range(-8, 9)]
    sigmas = [math.exp(v) for v in log_s]
    linear = [(v + 4) / 2 for v in log_s]
    cut = information_balanced_boundaries(sigmas, linear, 4)
    assert cut == pytest.approx([math.exp(-2), 1.0, math.exp(2)], rel=1e-9)
    low = [4.0 + min(v, 0.0) for v in log_s]  # flat above sigma 1, then falling to 0
    assert information_balanced_boundaries(sigmas, low, 4) == pytest.approx(
        [math.exp(-3), math.exp(-2), math.exp(-1)], rel=1e-9)
    # noise that rises again on the way down is ignored (running minimum)
    bumpy = list(linear)
    bumpy[3] += 1.5
    assert information_balanced_boundaries(sigmas, bumpy, 2) == pytest.approx([1.0], rel=1e-9)
    with pytest.raises(ValueError, match="does not fall"):
        information_balanced_boundaries(sigmas, [1.0] * len(sigmas), 4)
