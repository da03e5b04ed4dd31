"""Block schedules: which block a training step trains.

Every rank must train the same block in a step (or FSDP collectives mix blocks and
hang). Schedules are deterministic functions of the step and a seeded generator that
is identical on every rank and saved in the checkpoint; the train loop also
broadcasts rank 0's choice, so a desynchronised rank cannot go unnoticed.
"""

from typing import Callable

import torch


class BlockSchedule:
    def __init__(self, num_blocks: int, total_steps: int, seed: int):
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


class RoundRobinSchedule(BlockSchedule):
    def block_for_step(self, step: int) -> int:
        return (step - 1) % self.num_blocks


class SequentialSchedule(BlockSchedule):
    """Block 0 for the first 1/B of the run, then block 1, ..."""

    def block_for_step(self, step: int) -> int:
        return min((step - 1) * self.num_blocks // self.total_steps, self.num_blocks - 1)


BLOCK_SCHEDULES: dict[str, Callable[..., BlockSchedule]] = {
    "random": RandomSchedule,
    "round_robin": RoundRobinSchedule,
    "sequential": SequentialSchedule,
}


def build_block_schedule(name: str, num_blocks: int, total_steps: int, seed: int) -> BlockSchedule:
    return BLOCK_SCHEDULES[name](num_blocks, total_steps, seed)
