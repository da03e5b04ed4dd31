"""BlockPartition: which layers and which noise levels each block owns.

Built once from the `[diffusion_blocks]` section and the model's layer count; the
model, the train loop, the samplers and tools/partition.py all read it from here.
"""

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
        self, block: int, num_samples: int, generator: torch.Generator
    ) -> torch.Tensor:
        lo, hi = self.training_interval(block)
        return diffusion.sample_sigma(num_samples, lo, hi, self.schedule, generator)

    def block_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return diffusion.block_of_sigma(sigma, list(self.sigma_boundaries))

    def sampling_plan(self, num_steps: int) -> list[diffusion.EulerStep]:
        return diffusion.sampling_plan(
            num_steps, list(self.sigma_boundaries), self.schedule
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
