"""EDM (Karras et al. 2022) for DiffusionBlocks: the noise schedule, its preconditioning
and loss weight (docs/method.md sections 2, 3, 4 and 6).

Conventions:
- sigma boundaries are ascending: boundaries[0] = sigma_min, boundaries[-1] = sigma_max;
- block order is reversed: block 0 (the first layers) owns the HIGHEST interval;
- an interval owns its upper end, (lo, hi], so sigma_max belongs to block 0 and a
  descending Euler step that starts on a boundary runs in the block below it.
The law of sigma is in lognormal.py, the cut into block intervals in partition.py, the
sampling grid and steps in sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .lognormal import sample_sigma, truncated_mass
from .partition import block_sigma_boundaries, widen_interval
from .sampling import EulerStep, sampling_plan


@dataclass(frozen=True)
class NoiseSchedule:
    """EDM constants: ln(sigma) ~ N(p_mean, p_std^2) truncated to [sigma_min, sigma_max]."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    level_name: ClassVar[str] = "sigma"

    # the noise-level law a BlockPartition cuts (protocols.noise.NoiseLevels)

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
    ) -> list[EulerStep]:
        return sampling_plan(num_steps, boundaries, self, start_sigma)


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
