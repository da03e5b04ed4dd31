"""Block-parallel training: B groups of ranks train the B blocks at the same time.

World = B groups x G ranks, as a 2-D device mesh ("block_group", "group_shard").
Group g trains block g only, every step:
- a layer is an FSDP2 unit over its group's G ranks ("group_shard"); no collective of
  a layer ever leaves its group, and no activation crosses groups;
- the shared modules (embeddings, sigma embedder, final norm / AdaLN, head) form the
  root FSDP2 unit, sharded within the group and replicated across groups (HSDP over
  the 2-D mesh): their gradients are averaged over all ranks every step;
- gradients are sums (torchtitan's convention) of losses each group divides by its own
  item count: a layer's reduction over its group gives the group's mean, and the
  shared modules, summed over all B groups, divide by B;
- gradient clipping uses one global coefficient (norm^2 of the shared gradients plus
  the sum over groups of each block's norm^2), so shared parameters stay identical.
Each group holds a copy of every layer but only updates its own block's; before a
checkpoint `synchronize_blocks` broadcasts each block's layers and optimizer state
from the group that trains it, so every rank holds the same, current model.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools import utils as titan_utils

from ..components.dist_utils import to_local
from ..errors import ConfigError, origin_of
from .fsdp import apply_ac_and_compile, configure_gradient_reduction


@dataclass(frozen=True)
class BlockParallelLayout:
    num_blocks: int
    group_size: int
    group: int                 # = the block this rank trains
    mesh: DeviceMesh           # ("block_group", "group_shard")

    @property
    def cross_group(self) -> dist.ProcessGroup:
        """The ranks holding the same shard index in every group."""
        return self.mesh.get_group("block_group")


def build_layout(job_config, num_blocks: int, device_type: str) -> BlockParallelLayout:
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % num_blocks:
        raise ConfigError(
            f"{origin_of(job_config, 'diffusion_blocks', 'block_parallel')}: "
            f"[diffusion_blocks] block_parallel needs the number of processes "
            f"({world_size}) to be a multiple of num_blocks ({num_blocks})"
        )
    group_size = world_size // num_blocks
    mesh = init_device_mesh(
        device_type, (num_blocks, group_size), mesh_dim_names=("block_group", "group_shard")
    )
    return BlockParallelLayout(num_blocks, group_size, rank // group_size, mesh)


def parallelize_block_parallel(model: nn.Module, job_config, op_sac_save_list=None) -> nn.Module:
    """AC and compile per layer (torchtitan's), then the two-level FSDP2 described
    above. The layout is kept on the model (`model.block_parallel_layout`) for the
    trainer."""
    layout = build_layout(job_config, model.partition.num_blocks, titan_utils.device_type)
    apply_ac_and_compile(model, job_config, op_sac_save_list=op_sac_save_list)
    mp_policy = MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
    )
    for layer in model.layers.values():
        fully_shard(layer, mesh=layout.mesh["group_shard"], mp_policy=mp_policy)
    fully_shard(model, mesh=layout.mesh, mp_policy=mp_policy)
    configure_gradient_reduction(model, shared_divide_factor=layout.num_blocks)
    model.block_parallel_layout = layout
    return model


def block_parameters(model: nn.Module, block: int) -> list[nn.Parameter]:
    return [
        p for i in model.partition.layer_ranges[block]
        for p in model.layers[str(i)].parameters()
    ]


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    layer_ids = {id(p) for p in model.layers.parameters()}
    return [p for p in model.parameters() if id(p) not in layer_ids]


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Full (cross-shard) squared L2 norm of DTensor or plain gradients."""
    total = None
    for grad in grads:
        square = grad.float().pow(2).sum()
        square = square.full_tensor() if hasattr(square, "full_tensor") else square
        total = square if total is None else total + square
    return total if total is not None else torch.zeros(())


@torch.no_grad()
def clip_grad_norm_block_parallel(
    model: nn.Module, layout: BlockParallelLayout, max_norm: float
) -> torch.Tensor:
    """Clip every rank's gradients with one global coefficient; returns the global norm."""
    shared = [p.grad for p in shared_parameters(model) if p.grad is not None]
    own = [p.grad for p in block_parameters(model, layout.group) if p.grad is not None]
    shared_sq = _squared_norm(shared)
    blocks_sq = _squared_norm(own).to(shared_sq.device)
    dist.all_reduce(blocks_sq, op=dist.ReduceOp.SUM, group=layout.cross_group)
    total_norm = (shared_sq + blocks_sq).sqrt()
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    scale = float(coefficient)
    for grad in [*shared, *own]:
        grad.mul_(scale)
    return total_norm




@torch.no_grad()
def synchronize_blocks(model: nn.Module, optimizers, layout: BlockParallelLayout) -> None:
    """Broadcast each block's layer shards and optimizer state from its owning group."""
    states = [opt.state for opt in getattr(optimizers, "optimizers", [optimizers])]
    for block in range(layout.num_blocks):
        for param in block_parameters(model, block):
            tensors = [to_local(param)]
            for state in states:
                tensors += [
                    to_local(value) for value in state.get(param, {}).values()
                    if isinstance(value, torch.Tensor)
                ]
            for tensor in tensors:
                _broadcast_in_place(tensor, layout, src_group=block)


def _broadcast_in_place(tensor: torch.Tensor, layout: BlockParallelLayout, src_group: int):
    # NCCL needs the tensor on the mesh's device (Adam's step counter lives on the CPU)
    on_mesh = tensor.to(layout.mesh.device_type) if tensor.device.type != layout.mesh.device_type else tensor
    dist.broadcast(on_mesh, group=layout.cross_group, group_src=src_group)
    if on_mesh is not tensor:
        tensor.copy_(on_mesh)
