"""NoiseLevels: what a noise process gives a BlockPartition (EDM's sigma,
diffusion/edm.py NoiseSchedule; MD4's masking time, diffusion/masking.py
MaskingSchedule)."""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch


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
