"""Inference with a block-partitioned denoiser (DESIGN.md section 6).

`euler_sample` walks a `BlockPartition.sampling_plan` from sigma_max to sigma_min and
asks the caller's `denoise(z, sigma, block)` for the denoised estimate at each grid
point, passing the block that owns that sigma: the models run only that block's layers.
"""

from typing import Callable

import torch

from .diffusion import euler_step, EulerStep

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]


def euler_sample(denoise: Denoiser, z: torch.Tensor, plan: list[EulerStep]) -> torch.Tensor:
    """z at sigma_min after one Euler step per plan entry, each by its owning block."""
    for step in plan:
        denoised = denoise(z, step.sigma, step.block)
        z = euler_step(z, denoised, step.sigma, step.sigma_next)
    return z


def classifier_free_guidance(
    denoised_cond: torch.Tensor, denoised_uncond: torch.Tensor, scale: float
) -> torch.Tensor:
    """D = D_uncond + s (D_cond - D_uncond); s = 1 is the conditional estimate."""
    return denoised_uncond + scale * (denoised_cond - denoised_uncond)
