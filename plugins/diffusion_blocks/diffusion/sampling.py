"""Inference with a block-partitioned denoiser (docs/method.md section 6): the sampling grid,
the Euler, Heun and churn steps, the samplers that walk the grid, classifier-free
guidance and the count of network evaluations.

`euler_sample` and `heun_sample` walk a `BlockPartition.sampling_plan` from sigma_max
to sigma_min and ask the caller's `denoise(z, sigma, block)` for the denoised estimate
at each grid point, passing the block that owns that sigma: the models run only that
block's layers. Heun's second evaluation, at sigma_next, goes to the block owning
sigma_next (`EulerStep.next_block`), so every block is only ever asked about its own
sigmas, the ones it was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .lognormal import LogNormalLaw, lognormal_cdf, lognormal_icdf
from .partition import block_of_sigma


def sampling_sigmas(
    num_steps: int, schedule: LogNormalLaw, start_sigma: float | None = None
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
    num_steps: int, boundaries: list[float], schedule: LogNormalLaw,
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
    """D = softmax(logits) @ table for discrete targets (docs/method.md section 6): the
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
    sigma_max for images (docs/method.md section 6)."""
    return math.sqrt(1.0 + sigma_max**2) if data_is_unit_norm else sigma_max


Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


# step(z, evaluated at (sigma, its block), sigma, sigma_next, evaluate_next) -> z at
# sigma_next; evaluate_next(z') evaluates at sigma_next by the block owning it
PlanStep = Callable[[torch.Tensor, Any, float, float, Callable[[torch.Tensor], Any]], torch.Tensor]
# churn(z, step) -> (z raised to sigma_hat, sigma_hat, the block owning sigma_hat)
Churn = Callable[[torch.Tensor, EulerStep], tuple[torch.Tensor, float, int]]


def walk_plan(
    evaluate: Callable[[torch.Tensor, float, int], Any], z: torch.Tensor,
    plan: list[EulerStep], step: PlanStep, churn: Churn | None = None,
) -> torch.Tensor:
    """THE sampling loop over a plan: at every entry the block owning sigma evaluates
    z (`evaluate(z, sigma, block)`: a denoised estimate, or a text model's logits),
    then `step` moves z to sigma_next, with the block owning sigma_next at hand for a
    second evaluation (Heun). Every sampler of every family walks its plan here."""
    for entry in plan:
        sigma, block = entry.sigma, entry.block
        if churn is not None:
            z, sigma, block = churn(z, entry)

        def evaluate_next(z_next, entry=entry):
            return evaluate(z_next, entry.sigma_next, entry.next_block)

        z = step(z, evaluate(z, sigma, block), sigma, entry.sigma_next, evaluate_next)
    return z


def euler_sample(denoise: Denoiser, z: torch.Tensor, plan: list[EulerStep]) -> torch.Tensor:
    """z at sigma_min after one Euler step per plan entry, each by its owning block."""
    return walk_plan(denoise, z, plan, lambda z, denoised, sigma, sigma_next, _: euler_step(
        z, denoised, sigma, sigma_next))


def heun_sample(denoise: Denoiser, z: torch.Tensor, plan: list[EulerStep]) -> torch.Tensor:
    """z at sigma_min after one Heun step per plan entry: D(z, sigma) by the block
    owning sigma, D(z', sigma_next) by the block owning sigma_next."""
    return walk_plan(denoise, z, plan, heun_step)


ODE_SAMPLERS: dict[str, Callable[[Denoiser, torch.Tensor, list[EulerStep]], torch.Tensor]] = {
    "euler": euler_sample,
    "heun": heun_sample,
}


def evaluations_per_step(sampler: str, step: EulerStep) -> int:
    """Denoiser calls of one step: 1 for Euler; 2 for Heun (1 where sigma_next = 0,
    which our grids, ending at sigma_min > 0, never reach)."""
    return 2 if sampler == "heun" and step.sigma_next > 0 else 1


def network_evaluations(sampler: str, plan: list[EulerStep]) -> int:
    """NFE of a whole sampling run (a CFG pair, batched in one call, counts once)."""
    return sum(evaluations_per_step(sampler, step) for step in plan)


def classifier_free_guidance(
    denoised_cond: torch.Tensor, denoised_uncond: torch.Tensor, scale: float
) -> torch.Tensor:
    """D = D_uncond + s (D_cond - D_uncond); s = 1 is the conditional estimate."""
    return denoised_uncond + scale * (denoised_cond - denoised_uncond)
