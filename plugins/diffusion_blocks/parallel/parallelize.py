"""The parallelize functions the families' train specs name: torchtitan's FSDP2 path, the
block-wise sharding with offloaded layers (fsdp.py) or block-parallel training
(block_parallel.py), as the config asks."""

from torch import nn

from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import parallelize_llama
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list
from torchtitan.tools import utils as titan_utils

from ..models.cross_entropy_head import apply_head_loss
from .block_parallel import parallelize_block_parallel
from .fsdp import (
    apply_ac_and_compile,
    check_supported_parallelism,
    configure_gradient_reduction,
    data_parallel_mesh,
    offloads_inactive_blocks,
    shard_blockwise,
)


def parallelize_dblocks_llama(model: nn.Module, parallel_dims: ParallelDims, job_config):
    check_supported_parallelism(parallel_dims)
    # the head's class decides how its CE is computed; FSDP2 must wrap the final class
    apply_head_loss(model, job_config.diffusion_blocks)
    if block_parallel_enabled(job_config):
        return parallelize_block_parallel(model, job_config, op_sac_save_list=_op_sac_save_list)
    if not offloads_inactive_blocks(job_config):
        model = parallelize_llama(model, parallel_dims, job_config)  # torchtitan's path
        configure_gradient_reduction(model)
        return model
    apply_ac_and_compile(model, job_config, op_sac_save_list=_op_sac_save_list)
    shard_blockwise(model, data_parallel_mesh(parallel_dims, titan_utils.device_type), job_config,
                    offload_layers=True)
    return model


def parallelize_vision(model: nn.Module, parallel_dims: ParallelDims, job_config):
    """ViT / DiT: torchtitan's activation checkpointing and per-layer compile, then
    FSDP2 on each layer and on the root (which holds the shared modules: embeddings,
    sigma embedder, final norm / AdaLN and head), so a step gathers only the active
    block's layers. With offload_inactive_blocks the layers live in host memory."""
    check_supported_parallelism(parallel_dims)
    if block_parallel_enabled(job_config):
        return parallelize_block_parallel(model, job_config)
    apply_ac_and_compile(model, job_config)
    offload = offloads_inactive_blocks(job_config) or job_config.training.enable_cpu_offload
    if parallel_dims.fsdp_enabled or offload:
        shard_blockwise(model, data_parallel_mesh(parallel_dims, titan_utils.device_type),
                        job_config, offload_layers=offloads_inactive_blocks(job_config))
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError(
            "[parallelism] data_parallel_replicate_degree > 1 without sharding: the vision "
            "models use FSDP2; set data_parallel_shard_degree (HSDP: both)"
        )
    return model


def block_parallel_enabled(job_config) -> bool:
    section = job_config.diffusion_blocks
    return section.enable and section.block_parallel
