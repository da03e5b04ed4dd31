"""BlockPartition: which layers and which noise levels each block owns.

Built once from the `[diffusion_blocks]` section and the model's layer count; the
model, the train loop, the samplers and tools/partition.py all read it from here.
"""

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from . import diffusion
from .config import block_layer_ranges, DiffusionBlocks, layers_per_block


@dataclass(frozen=True)
class BlockPartition:
    """Plain values only (no ranges), so model args that hold it stay JSON-serialisable
    (torchtitan's Trainer logs `json.dumps(asdict(model_args))`)."""

    layer_counts: tuple[int, ...]  # layers per block, block 0 first
    sigma_boundaries: tuple[float, ...]  # ascending, B+1 values
    overlap: float
    schedule: diffusion.NoiseSchedule
    block0_sigma_sampling: str = "lognormal"
    """How block 0 (the highest interval) draws its training sigmas: a key of
    diffusion.SIGMA_LAWS. Every other block draws from the truncated log-normal."""
    sampling_sigma_max: float = 0.0
    """The sigma samplers start from (`sampling_start_sigma`); 0 = schedule.sigma_max."""

    @classmethod
    def from_config(cls, section: DiffusionBlocks, n_layers: int) -> "BlockPartition":
        counts = layers_per_block(section, n_layers)
        schedule = section.noise_schedule()
        boundaries = diffusion.block_sigma_boundaries(
            len(counts), schedule, section.partition
        )
        return cls(
            layer_counts=tuple(counts),
            sigma_boundaries=tuple(boundaries),
            overlap=section.overlap,
            schedule=schedule,
            block0_sigma_sampling=section.block0_sigma_sampling,
            sampling_sigma_max=section.sampling_sigma_max,
        )

    @classmethod
    def from_job_config(cls, job_config, n_layers: int) -> "BlockPartition":
        """As from_config, but a misfit names the file (or CLI flag) that set it."""
        from .config_loader import ConfigError, origin_of

        try:
            return cls.from_config(job_config.diffusion_blocks, n_layers)
        except ValueError as e:
            section = job_config.diffusion_blocks
            key = "layers_per_block" if section.layers_per_block else "num_blocks"
            raise ConfigError(f"{origin_of(job_config, 'diffusion_blocks', key)}: {e}") from None

    @cached_property
    def layer_ranges(self) -> tuple[range, ...]:
        """Contiguous layer index ranges, block 0 first."""
        return tuple(block_layer_ranges(list(self.layer_counts)))

    @property
    def num_blocks(self) -> int:
        return len(self.layer_counts)

    def sigma_interval(self, block: int) -> tuple[float, float]:
        return diffusion.block_interval(block, list(self.sigma_boundaries))

    def training_interval(self, block: int) -> tuple[float, float]:
        return diffusion.block_training_interval(
            block, list(self.sigma_boundaries), self.overlap, self.schedule
        )

    def training_mass(self, block: int) -> float:
        """Share of the global truncated log-normal inside the block's training interval."""
        return diffusion.truncated_mass(*self.training_interval(block), self.schedule)

    def sample_training_sigmas(
        self, block: int, shape: int | tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Training sigmas of `block`, float64 tensor of `shape` (an int: that many
        samples): the truncated log-normal on the block's widened interval, or for
        block 0 the law `block0_sigma_sampling` names."""
        law = self.block0_sigma_sampling if block == 0 else "lognormal"
        return self._sample(diffusion.SIGMA_LAWS[law], block, shape, generator)

    def sample_reference_sigmas(
        self, block: int, shape: int | tuple[int, ...], generator: torch.Generator
    ) -> torch.Tensor:
        """Sigmas of `block` from the truncated log-normal, whatever the training law:
        held-out figures drawn with it stay comparable across `block0_sigma_sampling`."""
        return self._sample(diffusion.sample_sigma, block, shape, generator)

    def _sample(self, law, block, shape, generator) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        lo, hi = self.training_interval(block)
        return law(math.prod(shape), lo, hi, self.schedule, generator).view(shape)

    def block_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return diffusion.block_of_sigma(sigma, list(self.sigma_boundaries))

    @property
    def sampling_start_sigma(self) -> float:
        """Where samplers start: `[diffusion_blocks] sampling_sigma_max`, else sigma_max."""
        return self.sampling_sigma_max or self.schedule.sigma_max

    def sampling_plan(
        self, num_steps: int, start_sigma: float | None = None
    ) -> list[diffusion.EulerStep]:
        """num_steps Euler steps from start_sigma (default: sigma_max, the whole range;
        pass `sampling_start_sigma` for the configured start) down to sigma_min."""
        return diffusion.sampling_plan(
            num_steps, list(self.sigma_boundaries), self.schedule, start_sigma
        )


def single_block_partition(schedule: diffusion.NoiseSchedule, n_layers: int) -> BlockPartition:
    """All layers in one block owning all of [sigma_min, sigma_max]: training sigmas
    come from the global truncated log-normal (the end-to-end DiT, the recurrent core)."""
    return BlockPartition(
        layer_counts=(n_layers,),
        sigma_boundaries=(schedule.sigma_min, schedule.sigma_max),
        overlap=0.0,
        schedule=schedule,
    )
