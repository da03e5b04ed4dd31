"""BlockPartition: which layers and which noise levels each block owns.

Built once from the `[diffusion_blocks]` section and the model's layer count; the
model, the train loop, the samplers and tools/partition.py all read it from here.

The noise levels are those of the partition's noise process (`schedule`, a
`NoiseLevels`): EDM's sigma with its truncated log-normal law (`diffusion.NoiseSchedule`,
the default: LM, ViT, DiT) or MD4's masking time t with t ~ U(0, 1)
(`masking.MaskingSchedule`). The process says how [lo, hi] is cut, widened, sampled
and walked at inference; the partition and the train loop only see ascending
boundaries, (lo, hi] intervals with block 0 owning the highest, and a level's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Protocol

import torch

from . import diffusion
from .errors import ConfigError, origin_of
from .masking import MaskingSchedule


class NoiseLevels(Protocol):
    """A noise process's law of levels, as a BlockPartition cuts it."""

    level_name: ClassVar[str]  # "sigma", "t": names the level in logs and metrics

    def boundaries(self, num_blocks: int, partition: str) -> list[float]:
        """B + 1 ascending boundaries; ValueError for a partition it does not define."""

    def widen(self, lo: float, hi: float, overlap: float) -> tuple[float, float]: ...

    def sample(self, num_samples: int, lo: float, hi: float, generator) -> torch.Tensor:
        """Levels in [lo, hi] from the law restricted there (float64)."""

    def mass(self, lo: float, hi: float) -> float:
        """Share of the law inside [lo, hi]."""

    def sampling_plan(self, num_steps: int, boundaries: list[float]) -> list:
        """The inference steps from the highest level down, each with its owning block."""


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
    schedule: diffusion.NoiseSchedule | MaskingSchedule  # the noise process (NoiseLevels)
    block0_sigma_sampling: str = "lognormal"
    """How block 0 (the highest interval) draws its training sigmas: a key of
    diffusion.SIGMA_LAWS, 'lognormal' being the noise process's own law (the only one
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
        return cls(
            layer_counts=tuple(counts),
            boundaries=tuple(schedule.boundaries(len(counts), section.partition)),
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
        return diffusion.block_interval(block, list(self.boundaries))

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
            law = diffusion.SIGMA_LAWS[self.block0_sigma_sampling]

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
        return diffusion.block_of_sigma(level, list(self.boundaries))

    @property
    def sampling_start_sigma(self) -> float:
        """Where samplers start: `[diffusion_blocks] sampling_sigma_max`, else the top level."""
        return self.sampling_sigma_max or self.boundaries[-1]

    def sampling_plan(self, num_steps: int, start_sigma: float | None = None) -> list:
        """The noise process's inference steps from `start_sigma` (default: the top level, the
        whole range; pass `sampling_start_sigma` for the configured start) down (EDM:
        `diffusion.EulerStep`s over the equi-probability sigma grid; masking:
        `masking.AncestralStep`s), each with the block owning its starting level."""
        return self.schedule.sampling_plan(num_steps, list(self.boundaries), start_sigma)
