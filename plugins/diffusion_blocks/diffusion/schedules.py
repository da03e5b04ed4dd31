"""Block schedules: which block a training step trains.

Every rank must train the same block in a step (or FSDP collectives mix blocks and
hang). Schedules are deterministic functions of the step and a seeded generator that
is identical on every rank and saved in the checkpoint; the train loop also
broadcasts rank 0's choice, so a desynchronised rank cannot go unnoticed.
"""

from typing import Callable

import torch


class BlockSchedule:
    def __init__(self, num_blocks: int, total_steps: int, seed: int, weights=()):
        self.num_blocks = num_blocks
        self.total_steps = total_steps
        self.generator = torch.Generator().manual_seed(seed)

    def block_for_step(self, step: int) -> int:
        """Block trained at `step` (1-based, as torchtitan counts)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class RandomSchedule(BlockSchedule):
    """Uniform block choice: reproduces the global noise distribution."""

    def block_for_step(self, step: int) -> int:
        return int(torch.randint(self.num_blocks, (1,), generator=self.generator))


class WeightedSchedule(BlockSchedule):
    """Random block choice with probabilities proportional to `weights` (one positive
    weight per block, block 0 first): e.g. more steps for block 0, where the token is
    decided. Same generator, broadcast and checkpointing as the random schedule."""

    def __init__(self, num_blocks: int, total_steps: int, seed: int, weights=()):
        super().__init__(num_blocks, total_steps, seed)
        probabilities = torch.tensor(list(weights), dtype=torch.float64)
        if probabilities.shape != (num_blocks,) or not bool(
            torch.all(torch.isfinite(probabilities) & (probabilities > 0))
        ):
            raise ValueError(
                f"block weights must be {num_blocks} finite numbers > 0, got {list(weights)}"
            )
        self.probabilities = probabilities / probabilities.sum()

    def block_for_step(self, step: int) -> int:
        return int(torch.multinomial(self.probabilities, 1, generator=self.generator))


class RoundRobinSchedule(BlockSchedule):
    def block_for_step(self, step: int) -> int:
        return (step - 1) % self.num_blocks


class SequentialSchedule(BlockSchedule):
    """Block 0 for the first 1/B of the run, then block 1, ..."""

    def block_for_step(self, step: int) -> int:
        return min((step - 1) * self.num_blocks // self.total_steps, self.num_blocks - 1)


BLOCK_SCHEDULES: dict[str, Callable[..., BlockSchedule]] = {
    "random": RandomSchedule,
    "weighted": WeightedSchedule,
    "round_robin": RoundRobinSchedule,
    "sequential": SequentialSchedule,
}


def build_block_schedule(
    name: str, num_blocks: int, total_steps: int, seed: int, weights=()
) -> BlockSchedule:
    """`weights`: the weighted schedule's per-block weights (ignored by the others)."""
    return BLOCK_SCHEDULES[name](num_blocks, total_steps, seed, weights)
