"""The block-wise train loop.

    torchrun --nproc_per_node N -m diffusion_blocks.train \
        --job.config_file train_configs/llama3_debug.toml [--section.key value ...]

Each step trains ONE block: the schedule picks it (identically on every rank), each
sample gets a sigma from the block's widened interval, and the model's root forward
runs only that block's layers plus the shared modules. With `[diffusion_blocks]
enable = false` the same loop trains the same model end to end.

Built from torchtitan's parts: ParallelDims and its device mesh, the train spec's
tokenizer / dataloader / parallelize (FSDP2, compile, activation checkpointing) /
optimizer / LR scheduler builders, model converters, CheckpointManager (DCP) and the
metric loggers (TensorBoard). We do not subclass torchtitan's Trainer: its __init__
hard-wires CUDA device handling (`device_type` is "cuda" on a CPU machine) and a
single loss path; the pieces it assembles are reused here unchanged.
"""

import copy
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.metrics import _build_metric_logger
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import parallel_dims as titan_parallel_dims
from torchtitan.distributed import utils as dist_utils
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import get_train_spec
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.logging import init_logger, logger

from . import block_parallel, registry  # registry: registers specs on `python -m`
from .config_loader import ConfigError, exit_on_config_error, origin_of, parse_job_config
from .schedules import build_block_schedule
from .tasks import EvalContext

# ---------------------------------------------------------------------------
# Devices and process groups


def select_device(job_config) -> torch.device:
    requested = job_config.training.device
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{origin_of(job_config, 'training', 'device')}: [training] device = 'cuda' "
            "but no CUDA device is available on this machine; use 'cpu' or 'auto'"
        )
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                "devices: launch at most that many processes per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device, job_config) -> int:
    """gloo on CPU, torchtitan's init (NCCL, flight recorder, timeouts) on CUDA."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if device.type == "cpu":
        # ParallelDims builds its device meshes on torchtitan's module-level
        # `device_type`, which says "cuda" on a machine without CUDA: with more than
        # one process the mesh then calls torch.cuda.set_device and fails.
        titan_parallel_dims.device_type = "cpu"
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo", timeout=timedelta(seconds=job_config.comm.init_timeout_seconds)
            )
    return dist_utils.init_distributed(job_config.comm, base_folder=job_config.job.dump_folder)


def build_parallel_dims(job_config, world_size: int) -> ParallelDims:
    p = job_config.parallelism
    try:
        return ParallelDims(
            dp_shard=p.data_parallel_shard_degree,
            dp_replicate=p.data_parallel_replicate_degree,
            cp=p.context_parallel_degree,
            tp=p.tensor_parallel_degree,
            pp=p.pipeline_parallel_degree,
            ep=p.expert_parallel_degree,
            etp=p.expert_tensor_parallel_degree,
            world_size=world_size,
        )
    except AssertionError as e:
        raise ConfigError(
            f"[parallelism] does not fit {world_size} processes: {e}. The product of "
            "data_parallel_replicate_degree, data_parallel_shard_degree and the other "
            "degrees must equal the number of processes (-1 for dp_shard fills the rest)"
        ) from None


# ---------------------------------------------------------------------------
# Memory and metrics


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


@dataclass
class BlockStats:
    """Steps and a running (EMA) CE per block, for the log."""

    steps: list[int]
    running_ce: list[float] = field(default_factory=list)
    decay: float = 0.9

    def update(self, block: int, ce: float) -> None:
        self.steps[block] += 1
        previous = self.running_ce[block]
        self.running_ce[block] = ce if math.isnan(previous) else (
            self.decay * previous + (1 - self.decay) * ce
        )


class StepMetrics:
    """torchtitan's metric loggers (TensorBoard/W&B) plus a per-step log line and a
    metrics.jsonl file on rank 0 (kept on a crash: it is appended and flushed)."""

    def __init__(self, job_config, parallel_dims: ParallelDims, device: torch.device):
        self.logger = _build_metric_logger(job_config, parallel_dims)
        self.log_freq = job_config.metrics.log_freq
        self.device = device
        self.rank = dist.get_rank()
        folder = Path(job_config.job.dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(folder / "metrics.jsonl", "a") if self.rank == 0 else None
        self.items_since_log = 0
        self.time_last_log = time.perf_counter()

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.log_freq == 0

    def log(self, step: int, metrics: dict[str, Any], block_stats: BlockStats | None):
        elapsed = time.perf_counter() - self.time_last_log
        metrics["throughput(items/s)"] = self.items_since_log / max(elapsed, 1e-9)
        metrics["memory/peak(GiB)"] = peak_memory_gib(self.device)
        scalars = dict(metrics)
        if block_stats is not None:
            for b, (n, ce) in enumerate(zip(block_stats.steps, block_stats.running_ce)):
                scalars[f"blocks/steps_block{b}"] = n
                if not math.isnan(ce):
                    scalars[f"blocks/running_ce_block{b}"] = ce
        self.logger.log(scalars, step)
        line = [f"step: {step:4d}"]
        if "block" in metrics:
            line.append(f"block: {int(metrics['block'])}")
        line += [
            f"loss: {metrics['loss']:9.4f}",
            f"ce: {metrics['ce']:7.4f}",
        ]
        if "sigma_mean" in metrics:
            line.append(f"sigma: {metrics['sigma_mean']:7.3f}")
        line += [
            f"grad_norm: {metrics['grad_norm']:8.4f}",
            f"lr: {metrics['lr']:.2e}",
            f"memory: {metrics['memory/peak(GiB)']:5.2f}GiB",
            f"tps: {metrics['throughput(items/s)']:,.0f}",
        ]
        logger.info("  ".join(line))
        if block_stats is not None:
            running = ", ".join("-" if math.isnan(c) else f"{c:.3f}" for c in block_stats.running_ce)
            logger.info(f"  steps per block: {block_stats.steps}  running ce per block: [{running}]")
        if self.jsonl is not None:
            record = {"step": step, **metrics}
            if block_stats is not None:
                record["block_steps"] = list(block_stats.steps)
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self.items_since_log = 0
        self.time_last_log = time.perf_counter()

    def log_eval(self, step: int, results: dict[str, float]) -> None:
        self.logger.log(results, step)
        logger.info(f"eval at step {step}: " + "  ".join(f"{k}: {v:.4f}" for k, v in results.items()))
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **results}) + "\n")
            self.jsonl.flush()

    def close(self):
        self.logger.close()
        if self.jsonl is not None:
            self.jsonl.close()


# ---------------------------------------------------------------------------
# Model construction (shared with tools/generate.py)


def build_model(job_config, device: torch.device, parallel_dims: ParallelDims, parallelize=None):
    """Meta-init the family's model (denoiser or its end-to-end twin), apply converters
    and parallelisation (the train spec's, or `parallelize(model)`), materialise on
    `device`. Returns (model, model_args, spec, family)."""
    family = registry.model_family(job_config.model.name)
    spec = get_train_spec(job_config.model.name)
    if job_config.model.flavor not in spec.model_args:
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'flavor')}: [model] flavor = "
            f"{job_config.model.flavor!r} is not a flavor of {job_config.model.name}; "
            f"available: {sorted(spec.model_args)}"
        )
    model_args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    model_args.update_from_config(job_config)
    enabled = job_config.diffusion_blocks.enable
    model_cls = spec.model_cls if enabled else family.end_to_end_model_cls
    with torch.device("meta"), titan_utils.set_default_dtype(
        TORCH_DTYPE_MAP[job_config.training.dtype]
    ):
        model = model_cls(model_args)
    build_model_converters(job_config, parallel_dims).convert(model)
    if parallelize is None:
        model = spec.parallelize_fn(model, parallel_dims, job_config)
    else:
        model = parallelize(model)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, model_args, spec, family


def trainable_parameter_groups(model) -> dict[str, int]:
    counts = {"total": sum(p.numel() for p in model.parameters())}
    partition = getattr(model, "partition", None)
    if partition is not None:
        for b, layers in enumerate(partition.layer_ranges):
            counts[f"block{b}"] = sum(
                p.numel() for i in layers for p in model.layers[str(i)].parameters()
            )
    return counts


@torch.no_grad()
def init_empty_optimizer_state(optimizers) -> None:
    """Give every parameter that has no optimizer state Adam's fresh state (step 0,
    zero moments), exactly what Adam would create lazily on its first update.

    Blocks that have not been trained yet otherwise have no state, so a checkpoint
    lacks their keys, and DCP cannot resume from it ("Missing key in checkpoint
    state_dict: optimizer.state.layers.N...": the loading side initialises state for
    every parameter). A parameter without a gradient is still skipped by Adam, so an
    inactive block is neither moved nor decayed and its step count stays 0.
    """
    from torch.optim.optimizer import _get_scalar_dtype

    for optimizer in optimizers:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in optimizer.param_groups:
            on_device = group.get("capturable") or group.get("fused")
            for p in group["params"]:
                if len(optimizer.state[p]) > 0:
                    continue
                state = optimizer.state[p]
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")),
                                device=p.device)
                    if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )


# ---------------------------------------------------------------------------
# The trainer


class BlockwiseTrainer(Stateful):
    def __init__(self, job_config):
        self.job_config = job_config
        self.device = select_device(job_config)
        world_size = init_process_group(self.device, job_config)
        self.rank = dist.get_rank()
        self.parallel_dims = parallel_dims = build_parallel_dims(job_config, world_size)
        self.enabled = job_config.diffusion_blocks.enable
        dist_utils.set_determinism(
            parallel_dims, self.device, job_config.debug, distinct_seed_mesh_dims=[]
        )
        if parallel_dims.dp_enabled:
            batch_mesh = parallel_dims.get_mesh("batch")
            dp_degree, dp_rank = batch_mesh.size(), batch_mesh.get_local_rank()
        else:
            dp_degree, dp_rank = 1, 0
        self.dp_degree, self.dp_rank = dp_degree, dp_rank

        spec = get_train_spec(job_config.model.name)
        self.tokenizer = spec.build_tokenizer_fn(job_config) if spec.build_tokenizer_fn else None
        self.dataloader = spec.build_dataloader_fn(
            dp_world_size=dp_degree, dp_rank=dp_rank, tokenizer=self.tokenizer,
            job_config=job_config,
        )
        section = job_config.diffusion_blocks
        self.layout = None
        parallelize = None
        if self.enabled and section.block_parallel:
            num_blocks = len(section.layers_per_block) or section.num_blocks
            self.layout = block_parallel.build_layout(job_config, num_blocks, self.device)
            parallelize = lambda model: block_parallel.parallelize_block_parallel(  # noqa: E731
                model, self.layout, job_config
            )
        self.model, self.model_args, self.train_spec, self.family = build_model(
            job_config, self.device, parallel_dims, parallelize
        )
        self.model.train()
        self.optimizers = spec.build_optimizers_fn(
            [self.model], job_config.optimizer, parallel_dims
        )
        init_empty_optimizer_state(self.optimizers)  # complete checkpoints from step 1
        self.lr_schedulers = spec.build_lr_schedulers_fn(
            self.optimizers, job_config.lr_scheduler, job_config.training.steps
        )

        global_batch = job_config.training.global_batch_size
        local_batch = job_config.training.local_batch_size
        if global_batch < 0:
            global_batch = local_batch * dp_degree
        if global_batch % (local_batch * dp_degree):
            raise ValueError(
                f"[training] global_batch_size {global_batch} must be a multiple of "
                f"local_batch_size x data-parallel degree = {local_batch * dp_degree}"
            )
        self.grad_accumulation_steps = global_batch // (local_batch * dp_degree)

        section = job_config.diffusion_blocks
        self.num_blocks = self.model.partition.num_blocks if self.enabled else 0
        if self.enabled:
            self.block_schedule = build_block_schedule(
                section.block_schedule, self.num_blocks, job_config.training.steps, section.seed
            )
            self.block_stats = BlockStats([0] * self.num_blocks, [math.nan] * self.num_blocks)
            self.max_norm = section.max_grad_norm
        else:
            self.block_schedule, self.block_stats = None, None
            self.max_norm = job_config.training.max_norm
        # per-rank generators for sigmas (CPU, float64) and noise (on the device)
        self.sigma_generator = torch.Generator().manual_seed(section.seed * 1000 + 1 + self.rank)
        self.noise_generator = torch.Generator(self.device).manual_seed(
            section.seed * 1000 + 2 + self.rank
        )

        self.step = 0
        self.items_seen = 0
        self.checkpointer = CheckpointManager(
            dataloader=self.dataloader,
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self},
            checkpoint_config=job_config.checkpoint,
            sd_adapter=None,
            base_folder=job_config.job.dump_folder,
        )
        self.metrics = StepMetrics(job_config, parallel_dims, self.device)

        counts = trainable_parameter_groups(self.model)
        mode = (
            f"DiffusionBlocks B={self.num_blocks} ({section.block_schedule} schedule, "
            f"{section.partition} partition, overlap {section.overlap})"
            if self.enabled else "end-to-end (diffusion_blocks disabled)"
        )
        logger.info(
            f"Model {job_config.model.name} {job_config.model.flavor}: "
            f"{counts['total']:,} parameters; {mode}; device {self.device}, "
            f"world size {world_size}, grad accumulation {self.grad_accumulation_steps}"
        )
        if self.enabled:
            for b in range(self.num_blocks):
                lo, hi = self.model.partition.training_interval(b)
                layers = self.model.partition.layer_ranges[b]
                logger.info(
                    f"  block {b}: layers {layers.start}-{layers.stop - 1} "
                    f"({counts[f'block{b}']:,} params), sigma in [{lo:.4g}, {hi:.4g}]"
                )

    # -- checkpointed state -------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "items_seen": self.items_seen,
            "enabled": self.enabled,
            "layer_ranges": [
                [r.start, r.stop] for r in self.model.partition.layer_ranges
            ] if self.enabled else [],
            # per-rank generators under per-rank keys, as torchtitan does for dataloaders
            f"sigma_rng_rank{self.rank}": self.sigma_generator.get_state(),
            f"noise_rng_rank{self.rank}": self.noise_generator.get_state(),
        }
        if self.enabled:
            state["block_schedule"] = self.block_schedule.state_dict()
            state["block_steps"] = list(self.block_stats.steps)
            state["block_running_ce"] = list(self.block_stats.running_ce)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("enabled") != self.enabled:
            raise ValueError(
                "checkpoint was saved with [diffusion_blocks] enable = "
                f"{state.get('enabled')}, this run has enable = {self.enabled}"
            )
        if self.enabled:
            saved = [list(r) for r in state["layer_ranges"]]
            ours = [[r.start, r.stop] for r in self.model.partition.layer_ranges]
            if saved != ours:
                raise ValueError(
                    f"checkpoint was saved with {len(saved)} blocks (layer ranges "
                    f"{saved}); this run has num_blocks = {len(ours)} (layer ranges "
                    f"{ours}). Resume with the same [diffusion_blocks] num_blocks / "
                    "layers_per_block, or start a new dump_folder"
                )
            self.block_schedule.load_state_dict(state["block_schedule"])
            self.block_stats.steps = list(state["block_steps"])
            self.block_stats.running_ce = list(state["block_running_ce"])
        self.step = state["step"]
        self.items_seen = state["items_seen"]
        for key, generator in (
            (f"sigma_rng_rank{self.rank}", self.sigma_generator),
            (f"noise_rng_rank{self.rank}", self.noise_generator),
        ):
            if key in state:
                generator.set_state(state[key])

    # -- one step ------------------------------------------------------------

    def choose_block(self) -> int:
        if self.layout is not None:
            return self.layout.group  # block-parallel: each group always trains its block
        block = self.block_schedule.block_for_step(self.step)
        if dist.get_world_size() > 1:
            # all ranks hold the same generator; rank 0's choice is authoritative
            chosen = torch.tensor([block], dtype=torch.int64, device=self.device)
            dist.broadcast(chosen, src=0)
            block = int(chosen.item())
        return block

    def next_microbatches(self, data_iterator):
        batches = []
        for _ in range(self.grad_accumulation_steps):
            try:
                inputs, labels = next(data_iterator)
            except StopIteration as e:
                raise DataloaderExhaustedError() from e
            batches.append((inputs, labels))
        return batches

    def extra_model_kwargs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """Attention masks for the end-to-end twin's flex/varlen flavors."""
        if getattr(self.model_args, "attn_type", "sdpa") in ("flex", "varlen"):
            return {"attention_masks": self.model.get_attention_masks(tokens, self.tokenizer)}
        return {}

    def train_step(self, data_iterator) -> dict[str, Any]:
        self.optimizers.zero_grad()  # set_to_none: inactive blocks keep grad None
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        block = self.choose_block() if self.enabled else None
        total_loss = torch.zeros((), device=self.device)
        total_unweighted = torch.zeros((), device=self.device)
        sigma_sum, sigma_count = 0.0, 0
        task = self.family.task
        for inputs, labels in self.next_microbatches(data_iterator):
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            labels = labels.to(self.device)
            if self.enabled:
                sigma_B = self.model.partition.sample_training_sigmas(
                    block, labels.shape[0], self.sigma_generator
                )
                sigma_sum, sigma_count = sigma_sum + float(sigma_B.sum()), sigma_count + len(sigma_B)
                out = task.denoiser_loss(
                    self.model, inputs, labels, block,
                    sigma_B.to(self.device, torch.float32), self.noise_generator,
                )
            else:
                out = task.end_to_end_loss(
                    self.model, inputs, labels, self.extra_model_kwargs(inputs["input"]),
                    self.noise_generator,
                )
            (out.loss / self.grad_accumulation_steps).backward()
            total_loss += out.loss.detach() / self.grad_accumulation_steps
            total_unweighted += out.unweighted / self.grad_accumulation_steps
            self.metrics.items_since_log += out.num_items * self.dp_degree
            self.items_seen += out.num_items * self.dp_degree

        params_with_grad = [p for p in self.model.parameters() if p.grad is not None]
        if self.layout is not None:
            grad_norm = block_parallel.clip_grad_norm_block_parallel(
                self.model, self.layout, self.max_norm
            )
        else:
            grad_norm = dist_utils.clip_grad_norm_(params_with_grad, self.max_norm, foreach=True)
        self.checkpointer.maybe_wait_for_staging()
        self.optimizers.step()
        self.lr_schedulers.step()

        loss, ce = self.mean_over_ranks(total_loss), self.mean_over_ranks(total_unweighted)
        if self.enabled:
            per_block = {block: ce} if self.layout is None else self.per_group_ce(total_unweighted)
            for trained_block, block_ce in per_block.items():
                self.block_stats.update(trained_block, block_ce)
        metrics = {"loss": loss, "ce": ce, "grad_norm": float(grad_norm), "lr": lr}
        if self.enabled:
            if self.layout is None:
                metrics["block"] = block
            metrics["sigma_mean"] = sigma_sum / max(sigma_count, 1)
        return metrics

    def per_group_ce(self, ce: torch.Tensor) -> dict[int, float]:
        """Block-parallel: every block trained this step, with its group's mean CE."""
        per_block = torch.zeros(self.num_blocks, device=self.device)
        per_block[self.layout.group] = ce / self.layout.group_size
        dist.all_reduce(per_block, op=dist.ReduceOp.SUM)
        return {b: float(v) for b, v in enumerate(per_block)}

    def checkpoint_due(self, last_step: bool) -> bool:
        checkpoint = self.job_config.checkpoint
        return checkpoint.enable and (last_step or self.step % checkpoint.interval == 0)

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        # SUM then divide: gloo has no AVG
        if dist.get_world_size() > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= dist.get_world_size()
        return float(value)

    # -- the loop --------------------------------------------------------------

    def train(self) -> None:
        config = self.job_config
        self.checkpointer.load(step=config.checkpoint.load_step)
        logger.info(f"Training starts at step {self.step + 1} of {config.training.steps}")
        data_iterator = iter(self.dataloader)
        while self.step < config.training.steps:
            self.step += 1
            try:
                metrics = self.train_step(data_iterator)
            except DataloaderExhaustedError:
                logger.warning("Ran out of data; last step was canceled.")
                self.step -= 1
                break
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"loss is {metrics['loss']} at step {self.step}"
                    + (f" (block {metrics.get('block')})" if self.enabled else "")
                )
            if self.metrics.should_log(self.step):
                self.metrics.log(self.step, metrics, self.block_stats)
            last_step = self.step == config.training.steps
            if self.layout is not None and self.checkpoint_due(last_step):
                block_parallel.synchronize_blocks(self.model, self.optimizers, self.layout)
            self.checkpointer.save(self.step, last_step=last_step)
            self.maybe_evaluate()
        if self.enabled:
            logger.info(f"Training done: steps per block {self.block_stats.steps}")
        else:
            logger.info("Training done")

    def maybe_evaluate(self) -> None:
        """The task's own evaluation (e.g. test accuracy, sample grids), when it has one
        and `[validation] enable`: every `[validation] freq` steps and after the last."""
        evaluate = getattr(self.family.task, "evaluate", None)
        validation = self.job_config.validation
        last = self.step == self.job_config.training.steps
        if evaluate is None or not validation.enable or not (last or self.step % validation.freq == 0):
            return
        if self.layout is not None and not self.checkpoint_due(last):
            # block-parallel: every rank needs every block's current weights
            block_parallel.synchronize_blocks(self.model, self.optimizers, self.layout)
        context = EvalContext(
            self.job_config, self.step, self.device, self.dp_rank, self.dp_degree,
            self.metrics.logger,
        )
        self.model.eval()
        with torch.no_grad():
            results = evaluate(self.model, context)
        self.model.train()
        if results:
            self.metrics.log_eval(self.step, results)

    def close(self) -> None:
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        if hasattr(self, "metrics"):
            self.metrics.close()


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    init_logger()
    job_config = parse_job_config(argv)
    trainer = None
    try:
        trainer = BlockwiseTrainer(job_config)
        trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
