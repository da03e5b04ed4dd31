"""Inference with a block-partitioned denoiser (DESIGN.md section 6).

`euler_sample` and `heun_sample` walk a `BlockPartition.sampling_plan` from sigma_max
to sigma_min and ask the caller's `denoise(z, sigma, block)` for the denoised estimate
at each grid point, passing the block that owns that sigma: the models run only that
block's layers. Heun's second evaluation, at sigma_next, goes to the block owning
sigma_next (`EulerStep.next_block`), so every block is only ever asked about its own
sigmas, the ones it was trained on.
"""

from typing import Callable

import torch

from .diffusion import euler_step, EulerStep, heun_step

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


def euler_sample(denoise: Denoiser, z: torch.Tensor, plan: list[EulerStep]) -> torch.Tensor:
    """z at sigma_min after one Euler step per plan entry, each by its owning block."""
    for step in plan:
        denoised = denoise(z, step.sigma, step.block)
        z = euler_step(z, denoised, step.sigma, step.sigma_next)
    return z


def heun_sample(denoise: Denoiser, z: torch.Tensor, plan: list[EulerStep]) -> torch.Tensor:
    """z at sigma_min after one Heun step per plan entry: D(z, sigma) by the block
    owning sigma, D(z', sigma_next) by the block owning sigma_next."""
    for step in plan:
        denoised = denoise(z, step.sigma, step.block)

        def denoise_next(z_euler):
            return denoise(z_euler, step.sigma_next, step.next_block)

        z = heun_step(z, denoised, step.sigma, step.sigma_next, denoise_next)
    return z


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
