"""The DiffusionBlocks core: noise distribution, block partition, EDM preconditioning,
loss weight and the Euler and Heun steps of the sampler (DESIGN.md sections 2, 3, 4 and 6).

Conventions:
- sigma boundaries are ascending: boundaries[0] = sigma_min, boundaries[-1] = sigma_max;
- block order is reversed: block 0 (the first layers) owns the HIGHEST interval;
- an interval owns its upper end, (lo, hi], so sigma_max belongs to block 0 and a
  descending Euler step that starts on a boundary runs in the block below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, ClassVar

import torch

_STD_NORMAL = NormalDist()


@dataclass(frozen=True)
class NoiseSchedule:
    """EDM constants: ln(sigma) ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max]."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    level_name: ClassVar[str] = "sigma"

    # the noise-level law a BlockPartition cuts (partition.NoiseLevels)

    def boundaries(self, num_blocks: int, partition: str) -> list[float]:
        return block_sigma_boundaries(num_blocks, self, partition)

    def widen(self, lo: float, hi: float, overlap: float) -> tuple[float, float]:
        return widen_interval(lo, hi, overlap, self)

    def sample(self, num_samples: int, lo: float, hi: float, generator) -> torch.Tensor:
        return sample_sigma(num_samples, lo, hi, self, generator)

    def mass(self, lo: float, hi: float) -> float:
        return truncated_mass(lo, hi, self)

    def sampling_plan(
        self, num_steps: int, boundaries: list[float], start_sigma: float | None = None
    ) -> list["EulerStep"]:
        return sampling_plan(num_steps, boundaries, self, start_sigma)


# ---------------------------------------------------------------------------
# The training distribution of sigma


def lognormal_cdf(sigma: float, schedule: NoiseSchedule) -> float:
    """q(sigma) = Phi((ln sigma - P_mean) / P_std)."""
    return _STD_NORMAL.cdf((math.log(sigma) - schedule.p_mean) / schedule.p_std)


def lognormal_icdf(q: float, schedule: NoiseSchedule) -> float:
    """sigma = exp(P_mean + P_std * Phi^-1(q))."""
    return math.exp(schedule.p_mean + schedule.p_std * _STD_NORMAL.inv_cdf(q))


def truncated_mass(lo: float, hi: float, schedule: NoiseSchedule) -> float:
    """Share of the truncated training distribution that lies in [lo, hi]."""
    q_min = lognormal_cdf(schedule.sigma_min, schedule)
    q_max = lognormal_cdf(schedule.sigma_max, schedule)
    return (lognormal_cdf(hi, schedule) - lognormal_cdf(lo, schedule)) / (q_max - q_min)


# ---------------------------------------------------------------------------
# Partitions of [sigma_min, sigma_max] into B intervals (ascending boundaries)


def equiprobable_boundaries(num_blocks: int, schedule: NoiseSchedule) -> list[float]:
    """B+1 ascending boundaries, each interval holding 1/B of the truncated log-normal."""
    q_min = lognormal_cdf(schedule.sigma_min, schedule)
    q_max = lognormal_cdf(schedule.sigma_max, schedule)
    inner = [
        lognormal_icdf(q_min + (b / num_blocks) * (q_max - q_min), schedule)
        for b in range(1, num_blocks)
    ]
    return [schedule.sigma_min, *inner, schedule.sigma_max]


def uniform_log_boundaries(num_blocks: int, schedule: NoiseSchedule) -> list[float]:
    """B+1 ascending boundaries with equal widths in ln(sigma) (the paper's ablation)."""
    log_lo, log_hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    inner = [
        math.exp(log_lo + (b / num_blocks) * (log_hi - log_lo))
        for b in range(1, num_blocks)
    ]
    return [schedule.sigma_min, *inner, schedule.sigma_max]


PARTITIONS: dict[str, Callable[[int, NoiseSchedule], list[float]]] = {
    "equiprobable": equiprobable_boundaries,
    "uniform_log": uniform_log_boundaries,
}


def block_sigma_boundaries(
    num_blocks: int, schedule: NoiseSchedule, partition: str = "equiprobable"
) -> list[float]:
    if partition not in PARTITIONS:
        raise ValueError(
            f"unknown partition {partition!r}; allowed: {sorted(PARTITIONS)}"
        )
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return PARTITIONS[partition](num_blocks, schedule)


def block_interval(block: int, boundaries: list[float]) -> tuple[float, float]:
    """(lo, hi) owned by `block`; block 0 owns the highest interval."""
    num_blocks = len(boundaries) - 1
    assert 0 <= block < num_blocks, (block, num_blocks)
    ascending_index = num_blocks - 1 - block
    return boundaries[ascending_index], boundaries[ascending_index + 1]


def block_of_sigma(sigma: torch.Tensor, boundaries: list[float]) -> torch.Tensor:
    """Index of the block owning each sigma, intervals taken as (lo, hi]."""
    num_blocks = len(boundaries) - 1
    inner = torch.tensor(boundaries[1:-1], dtype=torch.float64, device=sigma.device)
    # number of inner boundaries strictly below sigma = ascending interval index
    ascending_index = torch.searchsorted(inner, sigma.to(torch.float64), right=False)
    return (num_blocks - 1 - ascending_index).to(torch.long)


def widen_interval(
    lo: float, hi: float, overlap: float, schedule: NoiseSchedule
) -> tuple[float, float]:
    """Widen [lo, hi] by `overlap` times its log-width on each side, clipped to the range."""
    # multiplicative form: exactly (lo, hi) at overlap 0, no exp(log(x)) round-off
    log_width = math.log(hi / lo)
    widened_lo = lo * math.exp(-overlap * log_width)
    widened_hi = hi * math.exp(overlap * log_width)
    return max(widened_lo, schedule.sigma_min), min(widened_hi, schedule.sigma_max)


def block_training_interval(
    block: int, boundaries: list[float], overlap: float, schedule: NoiseSchedule
) -> tuple[float, float]:
    """The (widened) interval block `block` draws its training sigmas from."""
    lo, hi = block_interval(block, boundaries)
    return widen_interval(lo, hi, overlap, schedule)


def sample_sigma(
    num_samples: int,
    lo: float,
    hi: float,
    schedule: NoiseSchedule,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw sigmas from the log-normal truncated to [lo, hi], by inverse CDF (float64,
    on the generator's device)."""
    q_lo, q_hi = lognormal_cdf(lo, schedule), lognormal_cdf(hi, schedule)
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64, device=generator.device)
    q = q_lo + u * (q_hi - q_lo)
    sigma = torch.exp(schedule.p_mean + schedule.p_std * torch.special.ndtri(q))
    return sigma.clamp(lo, hi)


def sample_sigma_log_uniform(
    num_samples: int,
    lo: float,
    hi: float,
    schedule: NoiseSchedule,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw sigmas with ln(sigma) uniform on [ln lo, ln hi] (float64, on the generator's
    device): every octave of the interval gets the same share, whatever the log-normal."""
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64, device=generator.device)
    sigma = lo * torch.exp(u * math.log(hi / lo))
    return sigma.clamp(lo, hi)


# How a block draws its training sigmas inside its interval (`block0_sigma_sampling`)
SIGMA_LAWS: dict[str, Callable[..., torch.Tensor]] = {
    "lognormal": sample_sigma,
    "log_uniform": sample_sigma_log_uniform,
}


# ---------------------------------------------------------------------------
# EDM preconditioning and loss weight (s = sigma, sd = sigma_data)


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    return 1.0 / torch.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(sigma) / 4.0


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """w(sigma) = (s^2 + sd^2) / (s * sd)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoised_estimate(
    z: torch.Tensor, network_output: torch.Tensor, sigma: torch.Tensor, sigma_data: float
) -> torch.Tensor:
    """D = c_skip * z + c_out * h, sigma broadcast over the trailing dimensions of z."""
    sigma = broadcast_sigma(sigma, z)
    return c_skip(sigma, sigma_data) * z + c_out(sigma, sigma_data) * network_output


def broadcast_sigma(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma (one per sample, (B,), or one per row, e.g. (B, T)) with trailing unit
    dimensions added to match `like` (e.g. z of shape (B, T, D)), in like's dtype."""
    trailing = [1] * (like.dim() - sigma.dim())
    return sigma.to(like.dtype).reshape(*sigma.shape, *trailing)


# ---------------------------------------------------------------------------
# Sampling


def sampling_sigmas(
    num_steps: int, schedule: NoiseSchedule, start_sigma: float | None = None
) -> list[float]:
    """num_steps + 1 equi-probability points of the log-normal truncated to
    [sigma_min, start_sigma], descending, both ends included. start_sigma defaults to
    sigma_max (the whole training range)."""
    start = schedule.sigma_max if start_sigma is None else start_sigma
    if not schedule.sigma_min < start <= schedule.sigma_max:
        raise ValueError(
            f"start sigma {start} must lie in (sigma_min, sigma_max] = "
            f"({schedule.sigma_min}, {schedule.sigma_max}]"
        )
    q_min = lognormal_cdf(schedule.sigma_min, schedule)
    q_max = lognormal_cdf(start, schedule)
    inner = [
        lognormal_icdf(q_min + (k / num_steps) * (q_max - q_min), schedule)
        for k in range(1, num_steps)
    ]
    return [start, *reversed(inner), schedule.sigma_min]


@dataclass(frozen=True)
class EulerStep:
    """One step of the sampling grid, sigma -> sigma_next. `block` owns sigma and takes
    the step; `next_block` owns sigma_next: the next step's block, or at the last step
    the block owning sigma_min. Heun's second evaluation, D(z', sigma_next), is run by
    `next_block` (at a block boundary that is the block below, not `block`)."""

    sigma: float
    sigma_next: float
    block: int
    next_block: int


def sampling_plan(
    num_steps: int, boundaries: list[float], schedule: NoiseSchedule,
    start_sigma: float | None = None,
) -> list[EulerStep]:
    """The steps from start_sigma (default sigma_max) to sigma_min, each with the blocks
    that own its starting and its ending sigma; blocks whose interval lies wholly above
    start_sigma take no step. Grid points within 1e-9 (relative) of a block boundary
    are snapped onto it so float rounding cannot hand a step to the wrong block."""
    grid = sampling_sigmas(num_steps, schedule, start_sigma)
    for i, sigma in enumerate(grid):
        for boundary in boundaries:
            if abs(sigma - boundary) <= 1e-9 * boundary:
                grid[i] = boundary
    owners = block_of_sigma(torch.tensor(grid, dtype=torch.float64), boundaries).tolist()
    return [
        EulerStep(grid[k], grid[k + 1], owners[k], owners[k + 1]) for k in range(num_steps)
    ]


def euler_step(
    z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """z <- z + (sigma_next - sigma) * (z - D) / sigma (probability-flow ODE, EDM form)."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def ode_slope(z: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """dz/dsigma = (z - D(z, sigma)) / sigma: the probability-flow ODE (EDM form)."""
    return (z - denoised) / sigma


def heun_step(
    z: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float,
    denoise_next: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """EDM's second-order step (Karras et al. 2022, Algorithm 1, lines 5-8):

        d  = (z - D(z, sigma)) / sigma                    (denoised = D(z, sigma))
        z' = z + (sigma_next - sigma) d                   (the Euler step)
        d' = (z' - D(z', sigma_next)) / sigma_next        (denoise_next(z') = D(z', sigma_next))
        z_next = z + (sigma_next - sigma) (d + d') / 2

    EDM's grid ends at sigma = 0, where d' is undefined and the last step is Euler. Our
    grids end at sigma_min > 0, so every step is a Heun step (2 evaluations); the
    Euler fallback only serves a sigma_next of 0."""
    d = ode_slope(z, denoised, sigma)
    z_euler = z + (sigma_next - sigma) * d
    if sigma_next == 0:
        return z_euler
    d_next = ode_slope(z_euler, denoise_next(z_euler), sigma_next)
    return z + (sigma_next - sigma) * (d + d_next) / 2


def noised(clean: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """The forward process: z = y + sigma * eps."""
    return clean + sigma * noise


def expected_clean_embedding(logits_BV: torch.Tensor, table_VD: torch.Tensor) -> torch.Tensor:
    """D = softmax(logits) @ table for discrete targets (DESIGN.md section 6): the
    denoiser's posterior mean of the clean embedding, a convex combination of the
    table's rows (softmax in float32, the product in the table's dtype)."""
    return logits_BV.float().softmax(-1).to(table_VD.dtype) @ table_VD


def churn_gamma(churn: float, num_steps: int) -> float:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): each step first
    raises sigma by the factor 1 + gamma, gamma = min(S_churn / N, sqrt(2) - 1)."""
    return min(churn / num_steps, math.sqrt(2.0) - 1.0)


def churn(
    z: torch.Tensor, sigma: float, sigma_hat: float, noise: torch.Tensor
) -> torch.Tensor:
    """z at sigma -> z at sigma_hat >= sigma: add fresh noise of variance sigma_hat^2 - sigma^2."""
    return z + math.sqrt(sigma_hat**2 - sigma**2) * noise


def initial_noise_scale(sigma_max: float, data_is_unit_norm: bool) -> float:
    """Starting scale of z: sqrt(1 + sigma_max^2) for embedding targets (LM, ViT),
    sigma_max for images (DESIGN.md section 6)."""
    return math.sqrt(1.0 + sigma_max**2) if data_is_unit_norm else sigma_max
