"""BlockPartition: which layers and which noise levels each block owns.

Built once from the `[diffusion_blocks]` section and the model's layer count; the
model, the train loop, the samplers and tools/partition.py all read it from here.

The noise levels are those of the partition's noise process (`schedule`, a
`NoiseLevels`): EDM's sigma with its truncated log-normal law (`edm.NoiseSchedule`,
the default: LM, ViT, DiT) or MD4's masking time t with t ~ U(0, 1)
(`masking.MaskingSchedule`). The process says how [lo, hi] is cut, widened, sampled
and walked at inference; the partition and the train loop only see ascending
boundaries, (lo, hi] intervals with block 0 owning the highest, and a level's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ..errors import ConfigError, origin_of
from ..protocols.noise import NoiseLevels
from .lognormal import LogNormalLaw, lognormal_cdf, lognormal_icdf, SIGMA_LAWS


# ---------------------------------------------------------------------------
# Partitions of [sigma_min, sigma_max] into B intervals (ascending boundaries)


def equiprobable_boundaries(num_blocks: int, schedule: LogNormalLaw) -> list[float]:
    """B+1 ascending boundaries, each interval holding 1/B of the truncated log-normal."""
    q_min = lognormal_cdf(schedule.sigma_min, schedule)
    q_max = lognormal_cdf(schedule.sigma_max, schedule)
    inner = [
        lognormal_icdf(q_min + (b / num_blocks) * (q_max - q_min), schedule)
        for b in range(1, num_blocks)
    ]
    return [schedule.sigma_min, *inner, schedule.sigma_max]


def uniform_log_boundaries(num_blocks: int, schedule: LogNormalLaw) -> list[float]:
    """B+1 ascending boundaries with equal widths in ln(sigma) (the paper's ablation)."""
    log_lo, log_hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    inner = [
        math.exp(log_lo + (b / num_blocks) * (log_hi - log_lo))
        for b in range(1, num_blocks)
    ]
    return [schedule.sigma_min, *inner, schedule.sigma_max]


PARTITIONS: dict[str, Callable[[int, LogNormalLaw], list[float]]] = {
    "equiprobable": equiprobable_boundaries,
    "uniform_log": uniform_log_boundaries,
}


# `partition = "explicit"`: the inner boundaries are the config's `sigma_boundaries`
# (e.g. tools/balance_partition.py's information-balanced cut), not a rule of the law
EXPLICIT = "explicit"
PARTITION_NAMES = sorted([*PARTITIONS, EXPLICIT])


def explicit_boundaries(
    inner: list[float], num_blocks: int, lo: float, hi: float, level_name: str = "sigma"
) -> list[float]:
    """[lo, *inner, hi]: B - 1 given inner boundaries, strictly ascending inside (lo, hi)."""
    if len(inner) != num_blocks - 1:
        raise ValueError(
            f"sigma_boundaries has {len(inner)} values; partition = 'explicit' with "
            f"num_blocks = {num_blocks} needs {num_blocks - 1} (the inner boundaries, ascending)"
        )
    levels = [lo, *inner, hi]
    if any(not (a < b) for a, b in zip(levels, levels[1:])):
        raise ValueError(
            f"sigma_boundaries {list(inner)} must be strictly ascending inside "
            + (f"(sigma_min, sigma_max) = ({lo:g}, {hi:g})" if level_name == "sigma"
               else f"({lo:g}, {hi:g}), the model's noise level being {level_name}")
        )
    return levels


def information_balanced_boundaries(
    sigmas: list[float], ce: list[float], num_blocks: int
) -> list[float]:
    """The B - 1 inner boundaries that give each block an equal share of the drop in
    denoising CE from the highest measured sigma to the lowest (CDCD's time warping,
    cut instead of warped): `ce[i]` is the owning block's CE of the true token from a
    noisy row at `sigmas[i]`. The profile is made monotone (a running minimum from the
    top, so noise in the estimate cannot fold the cut back) and interpolated linearly
    in ln(sigma)."""
    if len(sigmas) != len(ce) or len(sigmas) < 2:
        raise ValueError("need at least two (sigma, CE) points of equal count")
    points = sorted(zip(sigmas, ce), reverse=True)  # from the top level down
    log_s, drops, lowest = [], [], math.inf
    for sigma, value in points:
        lowest = min(lowest, value)
        log_s.append(math.log(sigma))
        drops.append(points[0][1] - lowest if math.isfinite(points[0][1]) else 0.0)
    total = drops[-1]
    if not total > 0:
        raise ValueError("the CE profile does not fall from the top sigma to the bottom one: nothing to balance")
    inner = []
    for b in range(1, num_blocks):  # block b-1 (from the top) ends where b/B of the drop is done
        target = b / num_blocks * total
        i = next(i for i in range(1, len(drops)) if drops[i] >= target)
        span = drops[i] - drops[i - 1]
        frac = (target - drops[i - 1]) / span if span > 0 else 0.0
        inner.append(math.exp(log_s[i - 1] + frac * (log_s[i] - log_s[i - 1])))
    return sorted(inner)


def block_sigma_boundaries(
    num_blocks: int, schedule: LogNormalLaw, partition: str = "equiprobable"
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
    lo: float, hi: float, overlap: float, schedule: LogNormalLaw
) -> tuple[float, float]:
    """Widen [lo, hi] by `overlap` times its log-width on each side, clipped to the range."""
    # multiplicative form: exactly (lo, hi) at overlap 0, no exp(log(x)) round-off
    log_width = math.log(hi / lo)
    widened_lo = lo * math.exp(-overlap * log_width)
    widened_hi = hi * math.exp(overlap * log_width)
    return max(widened_lo, schedule.sigma_min), min(widened_hi, schedule.sigma_max)


def block_training_interval(
    block: int, boundaries: list[float], overlap: float, schedule: LogNormalLaw
) -> tuple[float, float]:
    """The (widened) interval block `block` draws its training sigmas from."""
    lo, hi = block_interval(block, boundaries)
    return widen_interval(lo, hi, overlap, schedule)


# ---------------------------------------------------------------------------
# Layers per block


def layers_per_block(section, n_layers: int) -> list[int]:
    """Layer counts per block for a model of n_layers (`section`: the [diffusion_blocks]
    section); raises ValueError if they don't fit."""
    if section.layers_per_block:
        counts = list(section.layers_per_block)
        if sum(counts) != n_layers:
            raise ValueError(
                f"[diffusion_blocks] layers_per_block = {counts} sums to {sum(counts)} "
                f"but the model has {n_layers} layers"
            )
        return counts
    if section.num_blocks > n_layers or n_layers % section.num_blocks:
        divisors = [b for b in range(1, n_layers + 1) if n_layers % b == 0]
        raise ValueError(
            f"[diffusion_blocks] num_blocks = {section.num_blocks} does not split the "
            f"model's {n_layers} layers equally; use one of {divisors} or give "
            f"layers_per_block explicitly"
        )
    return [n_layers // section.num_blocks] * section.num_blocks


def block_layer_ranges(counts: list[int]) -> list[range]:
    """Contiguous layer index ranges, block 0 first."""
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@dataclass(frozen=True)
class BlockPartition:
    """Plain values only (no ranges), so model args that hold it stay JSON-serialisable
    (torchtitan's Trainer logs `json.dumps(asdict(model_args))`)."""

    layer_counts: tuple[int, ...]  # layers per block, block 0 first
    boundaries: tuple[float, ...]  # noise levels, ascending, B+1 values
    overlap: float
    schedule: NoiseLevels  # the noise process: edm.NoiseSchedule or masking.MaskingSchedule
    block0_sigma_sampling: str = "lognormal"
    """How block 0 (the highest interval) draws its training sigmas: a key of
    lognormal.SIGMA_LAWS, 'lognormal' being the noise process's own law (the only one
    a masking process has). Every other block draws from the process's law."""
    sampling_sigma_max: float = 0.0
    """The sigma samplers start from (`sampling_start_sigma`); 0 = the top level."""

    @classmethod
    def from_config(
        cls, section, n_layers: int, schedule: NoiseLevels | None = None
    ) -> "BlockPartition":
        """`schedule`: the family's noise process; default EDM's, from the section."""
        counts = layers_per_block(section, n_layers)
        schedule = schedule or section.noise_schedule()
        if section.partition == EXPLICIT:
            # sigma_boundaries hold the inner levels of the model's process (sigma, or t)
            lo, hi = (section.sigma_min, section.sigma_max) if schedule.level_name == "sigma" else (0.0, 1.0)
            boundaries = explicit_boundaries(list(section.sigma_boundaries), len(counts), lo, hi,
                                             schedule.level_name)
        else:
            boundaries = schedule.boundaries(len(counts), section.partition)
        return cls(
            layer_counts=tuple(counts),
            boundaries=tuple(boundaries),
            overlap=section.overlap,
            schedule=schedule,
            block0_sigma_sampling=section.block0_sigma_sampling,
            sampling_sigma_max=section.sampling_sigma_max,
        )

    @classmethod
    def from_job_config(
        cls, job_config, n_layers: int, schedule: NoiseLevels | None = None
    ) -> "BlockPartition":
        """As from_config, but a misfit names the file (or CLI flag) that set it."""
        section = job_config.diffusion_blocks
        try:
            layers_per_block(section, n_layers)
        except ValueError as e:
            key = "layers_per_block" if section.layers_per_block else "num_blocks"
            raise ConfigError(f"{origin_of(job_config, 'diffusion_blocks', key)}: {e}") from None
        try:
            return cls.from_config(section, n_layers, schedule)
        except ValueError as e:
            where = origin_of(job_config, "diffusion_blocks", "partition")
            raise ConfigError(f"{where}: [diffusion_blocks] {e}") from None

    def single_block(self) -> "BlockPartition":
        """Every layer in one block owning all of the levels: the end-to-end twin's."""
        return BlockPartition(
            layer_counts=(sum(self.layer_counts),),
            boundaries=(self.boundaries[0], self.boundaries[-1]),
            overlap=0.0,
            schedule=self.schedule,
        )

    @cached_property
    def layer_ranges(self) -> tuple[range, ...]:
        """Contiguous layer index ranges, block 0 first."""
        return tuple(block_layer_ranges(list(self.layer_counts)))

    @property
    def num_blocks(self) -> int:
        return len(self.layer_counts)

    @property
    def level_name(self) -> str:
        return self.schedule.level_name

    def interval(self, block: int) -> tuple[float, float]:
        """(lo, hi] of the noise levels `block` owns."""
        return block_interval(block, list(self.boundaries))

    def training_interval(self, block: int) -> tuple[float, float]:
        """The interval widened by `overlap`: where the block's training levels lie."""
        return self.schedule.widen(*self.interval(block), self.overlap)

    def training_mass(self, block: int) -> float:
        """Share of the global training law inside the block's training interval."""
        return self.schedule.mass(*self.training_interval(block))

    def sample_training_levels(
        self, block: int, shape: int | tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Training levels (sigma, or t) of `block`, float64 tensor of `shape` (an int:
        that many samples): the process's law on the block's widened interval, or for
        block 0 the law `block0_sigma_sampling` names."""
        if block == 0 and self.block0_sigma_sampling != "lognormal":
            law = SIGMA_LAWS[self.block0_sigma_sampling]

            def block0_law(num_samples, lo, hi, generator):
                return law(num_samples, lo, hi, self.schedule, generator)

            return self._sample(block0_law, block, shape, generator)
        return self.sample_reference_levels(block, shape, generator)

    def sample_reference_levels(
        self, block: int, shape: int | tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Levels of `block` from the process's own law, whatever the training law:
        held-out figures drawn with it stay comparable across `block0_sigma_sampling`."""
        return self._sample(self.schedule.sample, block, shape, generator)

    def _sample(self, law, block, shape, generator) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        lo, hi = self.training_interval(block)
        return law(math.prod(shape), lo, hi, generator).view(shape)

    def block_of_level(self, level: torch.Tensor) -> torch.Tensor:
        """The block owning each level (intervals (lo, hi])."""
        return block_of_sigma(level, list(self.boundaries))

    @property
    def sampling_start_sigma(self) -> float:
        """Where samplers start: `[diffusion_blocks] sampling_sigma_max`, else the top level."""
        return self.sampling_sigma_max or self.boundaries[-1]

    def sampling_plan(self, num_steps: int, start_sigma: float | None = None) -> list:
        """The noise process's inference steps from `start_sigma` (default: the top level, the
        whole range; pass `sampling_start_sigma` for the configured start) down (EDM:
        `sampling.EulerStep`s over the equi-probability sigma grid; masking:
        `masking.AncestralStep`s), each with the block owning its starting level."""
        return self.schedule.sampling_plan(num_steps, list(self.boundaries), start_sigma)
