"""Small helpers the trainer pieces share: a DTensor's local shard, a sum over ranks,
and the parameter count of a set of layers."""

import torch
import torch.distributed as dist
from torch import nn


def to_local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks, in place (as it is in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def layer_parameter_count(model: nn.Module, layer_ids) -> int:
    """Parameters of the layers `model.layers[str(i)]`, i in layer_ids (a block's range)."""
    return sum(p.numel() for i in layer_ids for p in model.layers[str(i)].parameters())
