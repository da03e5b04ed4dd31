"""The training law of sigma: ln(sigma) ~ N(P_mean, P_std^2) truncated to [sigma_min,
sigma_max] (EDM), its cdf, inverse and mass, and the laws a block can draw its training
sigmas from. `schedule` is any LogNormalLaw (edm.NoiseSchedule is one): only its fields
are read."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable, Protocol

import torch


class LogNormalLaw(Protocol):
    """The fields of a schedule that the truncated log-normal law reads."""

    sigma_min: float
    sigma_max: float
    p_mean: float
    p_std: float

_STD_NORMAL = NormalDist()


def lognormal_cdf(sigma: float, schedule: LogNormalLaw) -> float:
    """q(sigma) = Phi((ln sigma - P_mean) / P_std)."""
    return _STD_NORMAL.cdf((math.log(sigma) - schedule.p_mean) / schedule.p_std)


def lognormal_icdf(q: float, schedule: LogNormalLaw) -> float:
    """sigma = exp(P_mean + P_std * Phi^-1(q))."""
    return math.exp(schedule.p_mean + schedule.p_std * _STD_NORMAL.inv_cdf(q))


def truncated_mass(lo: float, hi: float, schedule: LogNormalLaw) -> float:
    """Share of the truncated training distribution that lies in [lo, hi]."""
    q_min = lognormal_cdf(schedule.sigma_min, schedule)
    q_max = lognormal_cdf(schedule.sigma_max, schedule)
    return (lognormal_cdf(hi, schedule) - lognormal_cdf(lo, schedule)) / (q_max - q_min)


def sample_sigma(
    num_samples: int,
    lo: float,
    hi: float,
    schedule: LogNormalLaw,
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
    schedule: LogNormalLaw,
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
