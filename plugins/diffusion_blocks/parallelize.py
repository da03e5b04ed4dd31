"""Parallelisation: torchtitan's own FSDP2 / compile / activation-checkpoint paths,
plus what block-at-a-time training and CPU (gloo) runs need on top."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard, MixedPrecisionPolicy

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3 import parallelize_llama
from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_compile


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


def configure_gradient_reduction(model: nn.Module) -> None:
    """Every FSDP unit averages its gradients over its own mesh.

    - torchtitan's apply_fsdp disables FSDP's division (its trainer divides the loss by
      the global token count); our losses are per-rank means, and in block-parallel
      runs layers and shared modules reduce over different meshes, so each unit must
      average over its own: restore FSDP's default (divide factor None = mesh size).
    - gloo has neither AVG nor PREMUL_SUM: reduce with SUM and let FSDP2 divide
      afterwards (per module, not a global torch patch).
    """
    on_gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(None)  # None: FSDP's default mean
            if on_gloo:
                module.set_force_sum_reduction_for_comms(True)


def offloads_inactive_blocks(job_config) -> bool:
    section = job_config.diffusion_blocks
    if not section.enable:
        return False
    if section.offload_inactive_blocks == "auto":
        return section.block_schedule == "sequential"
    return section.offload_inactive_blocks == "on"


def apply_ac_and_compile(model: nn.Module, job_config, op_sac_save_list=None) -> None:
    """torchtitan's activation checkpointing and per-layer compile (need only model.layers)."""
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model, job_config.activation_checkpoint, model_compile_enabled=compile_enabled,
            op_sac_save_list=op_sac_save_list, base_folder=job_config.job.dump_folder,
        )
    if compile_enabled:
        apply_compile(model, job_config.compile)


def data_parallel_mesh(parallel_dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The FSDP mesh (HSDP when replicating); a one-rank mesh for a single process, so
    FSDP2's CPU offload is available there too."""
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        return parallel_dims.get_mesh(names)
    return init_device_mesh(device_type, (1,))


def shard_blockwise(
    model: nn.Module, mesh: DeviceMesh, job_config, offload_layers: bool
) -> None:
    """FSDP2 on each layer, then the root (which holds the shared modules).

    offload_layers: every layer's sharded parameters, gradients and optimizer state
    live in host memory (FSDP2 CPUOffloadPolicy); a layer is copied to the device
    only while its block computes. Shared modules stay on the device."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
    )
    layer_config = {"mesh": mesh, "mp_policy": mp_policy}
    if offload_layers:
        layer_config["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in model.layers.values():
        fully_shard(layer, **layer_config)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    configure_gradient_reduction(model)


def parallelize_dblocks_llama(model: nn.Module, parallel_dims: ParallelDims, job_config):
    check_supported_parallelism(parallel_dims)
    if not offloads_inactive_blocks(job_config):
        model = parallelize_llama(model, parallel_dims, job_config)  # torchtitan's path
        configure_gradient_reduction(model)
        return model
    apply_ac_and_compile(model, job_config, op_sac_save_list=_op_sac_save_list)
    device_type = "cuda" if torch.cuda.is_available() and job_config.training.device != "cpu" else "cpu"
    shard_blockwise(model, data_parallel_mesh(parallel_dims, device_type), job_config,
                    offload_layers=True)
    return model


def parallelize_vision(model: nn.Module, parallel_dims: ParallelDims, job_config):
    """ViT / DiT: torchtitan's activation checkpointing and per-layer compile, then
    FSDP2 on each layer and on the root (which holds the shared modules: embeddings,
    sigma embedder, final norm / AdaLN and head), so a step gathers only the active
    block's layers. With offload_inactive_blocks the layers live in host memory."""
    check_supported_parallelism(parallel_dims)
    apply_ac_and_compile(model, job_config)
    offload = offloads_inactive_blocks(job_config)
    if parallel_dims.fsdp_enabled or offload:
        device_type = "cuda" if torch.cuda.is_available() and job_config.training.device != "cpu" else "cpu"
        shard_blockwise(model, data_parallel_mesh(parallel_dims, device_type), job_config,
                        offload_layers=offload)
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError(
            "[parallelism] data_parallel_replicate_degree > 1 without sharding: the vision "
            "models use FSDP2; set data_parallel_shard_degree (HSDP: both)"
        )
    return model
