"""Parallelisation primitives: torchtitan's own FSDP2 / compile / activation-checkpoint
paths, plus what block-at-a-time training and CPU (gloo) runs need on top (the entry
functions the families name are in parallelize.py).

Gradient reduction follows torchtitan: FSDP sums gradients over ranks (no division)
and the trainer divides each loss by the global item count. In block-parallel runs
layers reduce within their group and the shared modules over all B groups, so the
shared modules divide by B (block_parallel.py)."""

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard, MixedPrecisionPolicy

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import apply_compile
from torchtitan.tools import utils as titan_utils


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


def configure_gradient_reduction(model: nn.Module, shared_divide_factor: float = 1.0) -> None:
    """Every FSDP unit sums its gradients (torchtitan's convention: the loss is already
    divided by the global item count); the root unit (the shared modules) divides by
    `shared_divide_factor`. gloo has neither AVG nor PREMUL_SUM: reduce with SUM and
    let FSDP2 divide afterwards (per module, not a global torch patch)."""
    on_gloo = dist.is_initialized() and dist.get_backend() == "gloo"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(
                shared_divide_factor if module is model else 1.0
            )
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


# The LM's shared modules FSDP2 wraps as units of their own, as torchtitan's apply_fsdp
# does: the token embedding, and the head group (final norm, final AdaLN, output). What
# is left (sigma embedder, ...) stays in the root unit.
EMBEDDING_UNIT = ("tok_embeddings",)
HEAD_UNIT = ("norm", "final_adaln", "output")


def shared_units(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(embedding unit, head unit) of a model that has both an embedding and an output
    (the LM families); two empty units for the others (vision models keep their shared
    modules in the root)."""
    if not all(hasattr(model, name) for name in ("tok_embeddings", "output")):
        return [], []
    embedding, head = (
        [getattr(model, name) for name in names if getattr(model, name, None) is not None]
        for names in (EMBEDDING_UNIT, HEAD_UNIT)
    )
    return embedding, head


def shard_blockwise(
    model: nn.Module, mesh: DeviceMesh, job_config, offload_layers: bool
) -> None:
    """FSDP2 on each layer, on the LM's embedding and head units, then the root.

    offload_layers: every layer's sharded parameters, gradients and optimizer state
    live in host memory (FSDP2 CPUOffloadPolicy); a layer is copied to the device
    only while its block computes. The shared modules stay on the device unless
    `[training] enable_cpu_offload` (torchtitan's whole-model offload) moves them to
    the host too: then the device holds only what the step is computing, one unit at
    a time (the embedding is gathered for the forward's start and the backward's end,
    the head group from the forward's end through its backward)."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
    )
    offload = CPUOffloadPolicy(pin_memory=titan_utils.device_type == "cuda")
    offload_shared = job_config.training.enable_cpu_offload
    unit_config = {"mesh": mesh, "mp_policy": mp_policy}
    shared_config = dict(unit_config, offload_policy=offload) if offload_shared else unit_config
    layer_config = dict(unit_config, offload_policy=offload) if offload_layers else shared_config
    for layer in model.layers.values():
        fully_shard(layer, **layer_config)
    embedding, head = shared_units(model)
    if embedding:
        fully_shard(embedding, **shared_config)
    if head:
        # as torchtitan: the head's backward follows its forward at once
        fully_shard(head, **shared_config, reshard_after_forward=False)
    fully_shard(model, **shared_config)
    configure_gradient_reduction(model)
