"""Memory accounting shared by tools/bench/memory.py and tools/bench/estimate_memory.py.

- activation bytes: tensors autograd saves for backward during a training forward,
  counted with saved-tensor hooks (unique storages), plus the inputs that activation
  checkpointing keeps for recomputation (checkpoint's own hooks hide those);
- resident bytes: parameters + gradients + optimizer state on the training device.
Both work on the meta device, so the estimator runs the real forward without memory.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.activation_checkpoint import apply_ac

from ..components.dist_utils import layer_parameter_count, to_local
from ..inference import build_model, single_process_parallel_dims
from ..models.cross_entropy_head import apply_head_loss, scores_labels_in_head
from ..parallel.fsdp import offloads_inactive_blocks, shared_units


def tensor_bytes(tensor: torch.Tensor) -> int:
    tensor = to_local(tensor)
    return tensor.numel() * tensor.element_size()


def _is_parameter_or_view(tensor: torch.Tensor) -> bool:
    """Parameters (FSDP's unsharded ones too) and their views (matmul saves weight.t())
    are resident memory, not activations: leaves that require grad, or views of them."""
    base = tensor._base if tensor._base is not None else tensor
    return base.is_leaf and base.requires_grad


class SavedTensorCounter:
    """Counts unique storages saved for backward while active."""

    def __init__(self):
        self.bytes = 0
        self._seen: set = set()

    def _add(self, tensor: torch.Tensor) -> None:
        storage = to_local(tensor).untyped_storage()
        key = storage._cdata  # the StorageImpl: unique per storage, meta included
        size = storage.nbytes()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += size

    def pack(self, tensor: torch.Tensor):
        if not _is_parameter_or_view(tensor):
            self._add(tensor)
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def checkpoint_input_hook(self, module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                self._add(value)


@contextmanager
def count_saved_activations(model: nn.Module):
    """with count_saved_activations(model) as counter: loss = ...; counter.bytes"""
    counter = SavedTensorCounter()
    handles = [
        module.register_forward_pre_hook(counter.checkpoint_input_hook, with_kwargs=True)
        for module in model.modules() if isinstance(module, CheckpointWrapper)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            yield counter
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ResidentBytes:
    params: int
    grads: int
    optimizer_state: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_state


def resident_bytes(model: nn.Module, optimizers, device: torch.device) -> ResidentBytes:
    """Bytes of parameters, gradients and optimizer state that live on `device`."""

    def on_device(t) -> bool:
        return isinstance(t, torch.Tensor) and to_local(t).device.type == device.type

    params = [p for p in model.parameters() if on_device(p)]
    grads = [p.grad for p in model.parameters() if p.grad is not None and on_device(p.grad)]
    state = [
        value
        for optimizer in getattr(optimizers, "optimizers", [optimizers])
        for param_state in optimizer.state.values()
        for value in param_state.values()
        if on_device(value) and to_local(value).dim() > 0  # skip scalar step counters
    ]
    return ResidentBytes(
        params=sum(tensor_bytes(p) for p in params),
        grads=sum(tensor_bytes(g) for g in grads),
        optimizer_state=sum(tensor_bytes(s) for s in state),
    )


def peak_device_bytes(device: torch.device) -> int | None:
    """max_memory_allocated on CUDA; None where the device cannot report it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


# ---------------------------------------------------------------------------
# Estimation on the meta device (nothing allocated)


class _FusedAttentionFootprint(torch.autograd.Function):
    """Stands in for SDPA on meta: saves what fused kernels (CPU flash, CUDA
    memory-efficient / flash, FlexAttention) save: q, k, v, out, logsumexp and the
    mask as an additive bias. Meta's own SDPA decomposes to the math path and would
    count the full S x S probabilities, which no fused kernel keeps."""

    @staticmethod
    def forward(ctx, q, k, v, mask_bias):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved = [q, k, v, out, logsumexp] + ([mask_bias] if mask_bias is not None else [])
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # pragma: no cover - estimation never runs backward
        raise RuntimeError("estimation only")


def _footprint_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    mask_bias = None
    if attn_mask is not None:
        mask_bias = attn_mask.new_empty(attn_mask.shape, dtype=q.dtype)
    return _FusedAttentionFootprint.apply(q, k, v, mask_bias)


@contextmanager
def fused_attention_footprint():
    """Scoped swap of F.scaled_dot_product_attention for the estimator's meta forward."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _footprint_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class StepEstimate:
    activation_bytes: int
    resident: ResidentBytes
    transient_bytes: int  # unsharded layer params during compute + logits

    @property
    def peak_bytes(self) -> int:
        return self.activation_bytes + self.resident.total + self.transient_bytes


def transient_logit_bytes(rows: int, vocab: int, chunk_rows: int | None) -> int:
    """float32 logits alive while the head's CE is computed: all rows' for the dense
    head, one chunk's for the chunked head (on CUDA with cut-cross-entropy less still:
    its kernel keeps no logits in global memory)."""
    return (rows if chunk_rows is None else min(rows, chunk_rows)) * vocab * 4


def offloaded_shared_bytes(model: nn.Module, shared: int, element: int) -> int:
    """Device bytes of the shared modules when they live on the host
    (`parallel.fsdp.shard_blockwise` with enable_cpu_offload, or torchtitan's own
    apply_fsdp): the root unit's parameters and gradients are gathered for the whole
    step; of the embedding and head units, the larger one's parameters and gradients
    (the head from the forward's end through its backward, the embedding at the
    backward's end, after the head's gradients have left for the host). `shared`: the
    parameters outside model.layers."""
    units = [sum(p.numel() for m in unit for p in m.parameters()) for unit in shared_units(model)]
    root = shared - sum(units)
    return 2 * (root + max(units)) * element


def estimate_step(job_config, nproc: int, block: int | None = None) -> StepEstimate:
    """Per-device memory of one training step of the configured model, on meta.

    Assumes FSDP2 over all `nproc` processes (parameters, gradients and AdamW state
    sharded 1/nproc) and AdamW (two fp32-sized moments per trained parameter).
    DiffusionBlocks without offload keeps every block's optimizer state resident
    once each block has trained; the gradient is that of one block plus the shared
    modules (the largest block is used unless `block` is given). With offload, only
    the shared modules' parameters, gradients and state are resident; a layer is
    all-gathered onto the device (parameters, then its gradient) while it computes.
    """

    def use_sdpa(model_args) -> None:
        if hasattr(model_args, "attn_type"):
            # flex/varlen need real masks; every fused kernel saves the same footprint
            model_args.attn_type = "sdpa"

    def prepare_for_training(model: nn.Module) -> nn.Module:
        apply_head_loss(model, job_config.diffusion_blocks)  # as parallelize_dblocks_llama does
        if job_config.activation_checkpoint.mode != "none":
            apply_ac(model, job_config.activation_checkpoint)
        return model

    meta = torch.device("meta")
    model, model_args, run = build_model(
        job_config, meta, single_process_parallel_dims(), parallelize=prepare_for_training,
        adjust_model_args=use_sdpa,
    )
    family, enabled = run.family, run.enabled

    batch, seq_len = job_config.training.local_batch_size, job_config.training.seq_len
    tokens = torch.zeros((batch, seq_len), dtype=torch.long, device=meta)
    inputs = {"input": tokens}
    if enabled:
        block_sizes = [layer_parameter_count(model, layers) for layers in model.partition.layer_ranges]
        block = max(range(len(block_sizes)), key=block_sizes.__getitem__) if block is None else block
    with fused_attention_footprint(), count_saved_activations(model) as counter:
        if enabled:
            family.task.denoiser_loss(
                model, inputs, tokens, block, torch.ones(batch, device=meta), None
            )
        else:
            family.task.end_to_end_loss(model, inputs, tokens, {}, None)

    element = TORCH_DTYPE_MAP[job_config.training.dtype].itemsize
    layer_params = {
        name: sum(p.numel() for p in layer.parameters()) for name, layer in model.layers.items()
    }
    total = sum(p.numel() for p in model.parameters())
    shared = total - sum(layer_params.values())
    trained = (
        shared + sum(layer_params[str(i)] for i in model.partition.layer_ranges[block])
        if enabled else total
    )
    biggest_layer = max(layer_params.values())
    logits = transient_logit_bytes(
        batch * seq_len, getattr(model_args, "vocab_size", 0),
        job_config.diffusion_blocks.head_loss_chunk_rows if scores_labels_in_head(model) else None,
    )
    if job_config.training.enable_cpu_offload:
        # torchtitan's whole-model offload: parameters, gradients and AdamW state all on
        # the host; the device holds the computing layers and shared units, unsharded
        resident = ResidentBytes(params=0, grads=0, optimizer_state=0)
        transient = 3 * biggest_layer * element + offloaded_shared_bytes(model, shared, element) + logits
    elif offloads_inactive_blocks(job_config):
        resident = ResidentBytes(
            params=shared * element // nproc,
            grads=shared * element // nproc,
            optimizer_state=2 * shared * 4 // nproc,
        )
        # the computing layer and the next (prefetch), unsharded, plus one gradient
        transient = 3 * biggest_layer * element + logits
    else:
        resident = ResidentBytes(
            params=total * element // nproc,
            grads=trained * element // nproc,
            optimizer_state=2 * total * 4 // nproc,
        )
        # FSDP2 all-gathers about two layers at a time (current + prefetch)
        transient = (2 * biggest_layer * element if nproc > 1 else 0) + logits
    return StepEstimate(counter.bytes, resident, transient)
