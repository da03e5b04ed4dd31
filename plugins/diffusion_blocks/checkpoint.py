"""Placeholder: replaced by the stock-checkpoint branch."""
from torchtitan.components.checkpoint import CheckpointManager


class BlockwiseCheckpointManager(CheckpointManager):
    pass
