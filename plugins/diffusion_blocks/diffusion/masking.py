"""MD4's masking process (Shi et al. 2024, "Simplified and Generalized Masked Diffusion
for Discrete Data") as a noise-level law a BlockPartition can cut.

Forward process: every token is independently replaced by [MASK] with probability
1 - alpha_t, t in [0, 1]. The continuous-time ELBO of a sequence x is

    -log p(x) <= E_{t ~ U(0, 1)} [ w(t) * sum_{i masked in x_t} -log p(x_i | x_t) ]
                 + L * (1 - alpha_0) * log V,        w(t) = -alpha_t' / (1 - alpha_t),

the last term being MD4's reconstruction term (tokens still masked at t = 0 are
predicted uniformly over the V data tokens). As in MD4, alpha is kept inside
[eps, 1 - eps]: alpha_t = (1 - 2 eps) a(t) + eps with a(t) one of
- linear:   a(t) = 1 - t                     (w(t) = 1/t when eps = 0)
- cosine:   a(t) = 1 - cos(pi/2 (1 - t))
- poly<k>:  a(t) = 1 - t^k.
MD4 also leaves out the prior term (a token still unmasked at t = 1, probability eps).

DiffusionBlocks reading (docs/method.md section 5): the noise level is t, with the law
t ~ U(0, 1) of MD4's training. The "equiprobable" partition cuts [0, 1] into intervals
of equal decrease of alpha: a token's unmasking time has CDF 1 - alpha_t, so every
block owns the same share of the unmasking events (equal t for the linear schedule).
As for sigma, block 0 owns the highest (most masked) interval, intervals are (lo, hi].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from .partition import block_of_sigma

MASKING_SCHEDULES = ("linear", "cosine", "poly<k>")
_POLY = re.compile(r"poly(\d+(?:\.\d+)?)")


def check_masking_schedule(kind: str) -> str | None:
    """None when `kind` names a schedule, else what is wrong."""
    if kind in ("linear", "cosine"):
        return None
    match = _POLY.fullmatch(kind)
    if match and float(match.group(1)) > 0:
        return None
    return f"{kind!r} is not one of 'linear', 'cosine', 'poly<k>' (k > 0, e.g. 'poly2')"


@dataclass(frozen=True)
class AncestralStep:
    """One step of MD4's ancestral sampler, from time t down to s < t, run by `block`
    (the owner of t)."""

    t: float
    s: float
    block: int


@dataclass(frozen=True)
class MaskingSchedule:
    kind: str = "linear"
    eps: float = 1e-4
    """MD4's clip: alpha in [eps, 1 - eps], so w(t) stays finite at t = 0."""

    level_name: ClassVar[str] = "t"

    def __post_init__(self):
        problem = check_masking_schedule(self.kind)
        if problem:
            raise ValueError(problem)

    @property
    def exponent(self) -> float:
        return float(_POLY.fullmatch(self.kind).group(1))

    # -- 1 - a(t), the unclipped masking probability, its derivative and inverse --
    # (written as 1 - a(t), not through a(t), so small t keeps its float32 precision)

    def raw_masked(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return t
        if self.kind == "cosine":
            return torch.cos(math.pi / 2 * (1 - t))
        return t**self.exponent

    def raw_masked_derivative(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return torch.ones_like(t)
        if self.kind == "cosine":
            return math.pi / 2 * torch.sin(math.pi / 2 * (1 - t))
        return self.exponent * t ** (self.exponent - 1)

    def time_of_raw_masked(self, m: torch.Tensor) -> torch.Tensor:
        """t with raw_masked(t) = m (m in [0, 1])."""
        if self.kind == "linear":
            return m
        if self.kind == "cosine":
            return 1 - torch.arccos(m) * 2 / math.pi
        return m ** (1 / self.exponent)

    # -- the clipped schedule and the ELBO -----------------------------------------

    def masked_probability(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t: the probability that a token is masked at time t."""
        return (1 - 2 * self.eps) * self.raw_masked(t) + self.eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still unmasked at time t."""
        return 1 - self.masked_probability(t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha_t' / (1 - alpha_t) (positive; 1/t for linear at eps = 0)."""
        return (1 - 2 * self.eps) * self.raw_masked_derivative(t) / self.masked_probability(t)

    def reconstruction_nats(self, data_vocab_size: int) -> float:
        """MD4's reconstruction term per token: (1 - alpha_0) log V."""
        return self.eps * math.log(data_vocab_size)

    def unmask_probability(self, t: float, s: float) -> float:
        """Probability that a token masked at t is unmasked at s < t:
        (alpha_s - alpha_t) / (1 - alpha_t). At s = 0 (the end of sampling) it is 1:
        every token still masked is drawn (MD4 decodes the share eps left masked at
        alpha_0 = 1 - eps by a last prediction)."""
        if s <= 0.0:
            return 1.0
        alpha_t, alpha_s = (float(self.alpha(torch.tensor(x, dtype=torch.float64))) for x in (t, s))
        return (alpha_s - alpha_t) / (1 - alpha_t)

    # -- the noise-level law a BlockPartition cuts (protocols.noise.NoiseLevels) ----------

    def equal_alpha_times(self, num_intervals: int, lo: float = 0.0, hi: float = 1.0) -> list[float]:
        """num_intervals + 1 ascending times cutting [lo, hi] into equal decreases of alpha."""
        m_lo, m_hi = self.raw_masked(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
        m = m_lo + (m_hi - m_lo) * torch.arange(num_intervals + 1, dtype=torch.float64) / num_intervals
        times = self.time_of_raw_masked(m).tolist()
        times[0], times[-1] = lo, hi  # exact ends, whatever the rounding
        return times

    def block_grid(self, boundaries: list[float], per_block: int) -> list[float]:
        """Ascending times from 0 to 1: every block's interval cut into `per_block` equal
        decreases of alpha (for the equiprobable partition, equal_alpha_times(B x per_block))."""
        times = [boundaries[0]]
        for lo, hi in zip(boundaries, boundaries[1:]):
            times += self.equal_alpha_times(per_block, lo, hi)[1:]
        return times

    def boundaries(self, num_blocks: int, partition: str) -> list[float]:
        if partition != "equiprobable":
            raise ValueError(
                f"partition {partition!r} is not defined for the masking process: "
                "'equiprobable' (equal decrease of alpha_t per block) or 'explicit' "
                "(sigma_boundaries: the inner t boundaries, e.g. from tools/balance_partition.py)"
            )
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return self.equal_alpha_times(num_blocks)

    def widen(self, lo: float, hi: float, overlap: float) -> tuple[float, float]:
        """Widen [lo, hi] by `overlap` times its alpha-width on each side, within [0, 1]."""
        if overlap == 0.0:
            return lo, hi
        m_lo, m_hi = self.raw_masked(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
        margin = overlap * (m_hi - m_lo)
        widened = self.time_of_raw_masked(torch.tensor(
            [max(m_lo - margin, 0.0), min(m_hi + margin, 1.0)], dtype=torch.float64))
        return max(float(widened[0]), 0.0), min(float(widened[1]), 1.0)

    def sample(
        self, num_samples: int, lo: float, hi: float, generator: torch.Generator
    ) -> torch.Tensor:
        """t ~ U(lo, hi], stratified over the samples as MD4's antithetic time sampling:
        one uniform offset u, sample i at (u + i/n) mod 1 (float64, on the generator's
        device; torch's default generator when None). Never exactly lo, so t > 0."""
        device = generator.device if generator is not None else None
        offset = torch.rand(1, generator=generator, dtype=torch.float64, device=device)
        u = torch.remainder(
            offset + torch.arange(num_samples, dtype=torch.float64, device=device) / num_samples,
            1.0,
        )
        return hi - u * (hi - lo)

    def mass(self, lo: float, hi: float) -> float:
        """Share of t ~ U(0, 1) inside [lo, hi]."""
        return hi - lo

    def sampling_plan(
        self, num_steps: int, boundaries: list[float], start: float | None = None
    ) -> list[AncestralStep]:
        """Ancestral steps from t = 1 to 0, each with the block that owns its t: with
        num_steps a multiple of B every block takes num_steps / B steps of equal decrease
        of alpha over its own interval (equiprobable partition: each step unmasks the
        same expected share of the tokens), else one grid of equal decreases of alpha.
        Sampling always starts from t = 1 (all masked): `start` must be None or 1."""
        assert start is None or start == 1.0, f"masked diffusion samples from t = 1, not {start}"
        blocks = len(boundaries) - 1
        if num_steps % blocks == 0:
            grid = self.block_grid(list(boundaries), num_steps // blocks)[::-1]
        else:
            grid = self.equal_alpha_times(num_steps)[::-1]
        for i, t in enumerate(grid):  # snap onto block boundaries: no rounding hand-off
            for boundary in boundaries:
                if abs(t - boundary) <= 1e-12:
                    grid[i] = boundary
        owners = block_of_sigma(torch.tensor(grid[:-1], dtype=torch.float64), boundaries)
        return [AncestralStep(grid[k], grid[k + 1], int(owners[k])) for k in range(num_steps)]


def mask_tokens(
    tokens_BT: torch.Tensor, alpha_B: torch.Tensor, mask_token_id: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """x_t: each token kept with probability alpha (its row's), else [MASK]."""
    keep_BT = torch.rand(
        tokens_BT.shape, generator=generator, device=tokens_BT.device
    ) < alpha_B.to(tokens_BT.device, torch.float32)[:, None]
    return torch.where(keep_BT, tokens_BT, torch.full_like(tokens_BT, mask_token_id))


def elbo_share_boundaries(times: list[float], nats: list[float], num_blocks: int) -> list[float]:
    """The B - 1 inner t boundaries that give each block an equal share of the ELBO,
    integral over t of the integrand `nats[i]` measured at `times[i]` (nats per token:
    w(t) times the masked tokens' CE; trapezoids between the points, the end points
    extended flat to t = 0 and 1). The paper's partition gives each block an equal
    share of the unmasking events instead."""
    if len(times) != len(nats) or len(times) < 2:
        raise ValueError("need at least two (t, ELBO integrand) points of equal count")
    points = sorted(zip(times, nats))
    if not all(0.0 < t < 1.0 for t, _ in points) or any(not v >= 0.0 for _, v in points):
        raise ValueError("times must lie inside (0, 1) and the integrand be >= 0 and finite")
    knots = [(0.0, points[0][1]), *points, (1.0, points[-1][1])]
    areas = [0.0]
    for (t0, v0), (t1, v1) in zip(knots, knots[1:]):
        areas.append(areas[-1] + (t1 - t0) * (v0 + v1) / 2)
    total = areas[-1]
    if not (total > 0.0 and math.isfinite(total)):
        raise ValueError("the ELBO integrand is zero everywhere: nothing to share")
    inner = []
    for b in range(1, num_blocks):
        target = b / num_blocks * total
        i = next(i for i in range(1, len(areas)) if areas[i] >= target)
        (t0, v0), (t1, v1) = knots[i - 1], knots[i]
        inner.append(t0 + (t1 - t0) * _trapezoid_fraction(v0, v1, (target - areas[i - 1]) / (areas[i] - areas[i - 1])))
    return inner


def _trapezoid_fraction(v0: float, v1: float, share: float) -> float:
    """x in [0, 1] where the area under the line from v0 (x = 0) to v1 (x = 1) reaches
    `share` of the whole trapezoid's."""
    slope = v1 - v0
    area = share * (v0 + v1) / 2
    if abs(slope) < 1e-12 * max(v0, v1, 1e-300):
        return share
    # v0 x + slope x^2 / 2 = area
    return (-v0 + math.sqrt(max(v0 * v0 + 2 * slope * area, 0.0))) / slope
