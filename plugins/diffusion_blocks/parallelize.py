"""Parallelisation: torchtitan's own FSDP2 / compile / activation-checkpoint paths,
plus what block-at-a-time training and CPU (gloo) runs need on top."""

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import parallelize_llama


def check_supported_parallelism(parallel_dims: ParallelDims) -> None:
    unsupported = {
        "tensor_parallel_degree": parallel_dims.tp,
        "context_parallel_degree": parallel_dims.cp,
        "pipeline_parallel_degree": parallel_dims.pp,
        "expert_parallel_degree": parallel_dims.ep,
    }
    used = {name: degree for name, degree in unsupported.items() if degree > 1}
    if used:
        raise ValueError(
            f"[parallelism] {used}: DiffusionBlocks trains one block per step with "
            "data parallelism (FSDP2); set these degrees to 1 and use "
            "data_parallel_shard_degree / data_parallel_replicate_degree"
        )


def use_sum_reductions_on_gloo(model: nn.Module) -> None:
    """gloo has neither AVG nor PREMUL_SUM; FSDP2 then reduces with SUM and divides
    by the data-parallel size itself (same mean gradient). Per module, not a global
    torch patch."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def parallelize_dblocks_llama(model: nn.Module, parallel_dims: ParallelDims, job_config):
    check_supported_parallelism(parallel_dims)
    model = parallelize_llama(model, parallel_dims, job_config)
    use_sum_reductions_on_gloo(model)
    return model
