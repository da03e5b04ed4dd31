"""Parallelisation: torchtitan's own FSDP2 / compile / activation-checkpoint paths,
plus what block-at-a-time training and CPU (gloo) runs need on top."""

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard, MixedPrecisionPolicy

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3 import parallelize_llama
from torchtitan.models.llama3.infra.parallelize import apply_compile


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


def parallelize_vision(model: nn.Module, parallel_dims: ParallelDims, job_config):
    """ViT / DiT: activation checkpointing and compile per layer (torchtitan's own
    functions, which need only `model.layers`), then FSDP2 on each layer and the root.

    The root unit holds the shared modules (embeddings, sigma embedder, final norm and
    head); each layer is its own unit, so a step all-gathers only the active block."""
    check_supported_parallelism(parallel_dims)
    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model, job_config.activation_checkpoint, model_compile_enabled=compile_enabled,
            base_folder=job_config.job.dump_folder,
        )
    if compile_enabled:
        apply_compile(model, job_config.compile)
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        mp_policy = MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
        )
        fsdp_config = {"mesh": parallel_dims.get_mesh(names), "mp_policy": mp_policy}
        if job_config.training.enable_cpu_offload:
            fsdp_config["offload_policy"] = CPUOffloadPolicy()
        for layer in model.layers.values():
            fully_shard(layer, **fsdp_config)
        fully_shard(model, **fsdp_config)
        use_sum_reductions_on_gloo(model)
    elif parallel_dims.dp_replicate_enabled:
        raise ValueError(
            "[parallelism] data_parallel_replicate_degree > 1 without sharding: the vision "
            "models use FSDP2; set data_parallel_shard_degree (HSDP: both)"
        )
    return model
