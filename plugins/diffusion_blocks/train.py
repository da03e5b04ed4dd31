"""The block-wise trainer: torchtitan's Trainer with the DiffusionBlocks step.

    torchrun --nproc_per_node N -m diffusion_blocks.train \
        --job.config_file train_configs/llama3_debug.toml [--section.key value ...]
    TRAIN_FILE=diffusion_blocks.train ./run_train.sh      # torchtitan's launcher

`BlockwiseTrainer` subclasses torchtitan 0.2.2's `torchtitan.train.Trainer`, which
builds and runs everything (distributed init from `[comm]`, ParallelDims, tokenizer and
dataloader, the model on meta, converters, parallelize, CheckpointManager, metrics
processor, validator, profiling, GC, the train loop). What changes is only:
- the step: each step trains ONE block, chosen identically on every rank; each sample
  gets a noise level from the block's widened interval (sigma, or MD4's masking time t:
  the partition's noise process draws it); the family's task computes the weighted
  loss, and only that block's layers run (`forward_backward_step`, `train_step`, which
  also clips block-parallel runs with one global coefficient);
- a step is committed only if it is finite: before the optimizer steps, the loss and
  the gradient norm are checked on every rank; a non-finite one stops the run or
  skips the step (`[diffusion_blocks] on_nonfinite`, `max_nonfinite_skips`);
- per-block bookkeeping (steps and running CE per block, in the log and TensorBoard);
- extra checkpointed state (block-choice, sigma and noise generators; the partition;
  the count of skipped steps), and the run's identity and restart marker handed to
  the checkpointer and metrics.jsonl.
With `[diffusion_blocks] enable = false` the same trainer trains the end-to-end twin.
The train spec it is given comes from `registry.resolve_run_spec`; the CPU adaptation
of torchtitan's module-level CUDA names lives in `titan_compat`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from torchtitan.components.dataloader import DataloaderExhaustedError
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.train import Trainer
from torchtitan.tools.logging import init_logger, logger

from . import titan_compat
from .components.checkpoint import BlockwiseCheckpointManager
from .components.dist_utils import layer_parameter_count
from .components.dump_lock import DumpFolderLock
from .components.metrics import BLOCKWISE_PREFIX
from .components.run_identity import run_identity
from .config.loader import parse_job_config
from .diffusion.schedules import build_block_schedule
from .errors import ConfigError, exit_on_config_error, origin_of
from .parallel import block_parallel
from .parallel.fsdp import check_supported_parallelism
from .registry import resolve_run_spec

# what torchrun sets; a plain `python -m diffusion_blocks.train` is one process
SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                      "MASTER_ADDR": "127.0.0.1"}
_local_rendezvous_store = None  # kept alive for the process: the process group uses it


def use_single_process_env() -> None:
    """Fill in what torchrun would set, for a launch without it (one process);
    torchtitan's Trainer starts the process group from it. Without a MASTER_PORT the
    rendezvous store is started here, on a port the kernel picks (port 0), and the
    process group connects to that live store (TORCHELASTIC_USE_AGENT_STORE, as
    torchrun's workers do): no port is chosen, released and bound again later, where
    another process could take it in between."""
    global _local_rendezvous_store
    for key, value in SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        _local_rendezvous_store = dist.TCPStore(
            os.environ["MASTER_ADDR"], 0, world_size=1, is_master=True, wait_for_workers=False
        )
        os.environ["MASTER_PORT"] = str(_local_rendezvous_store.port)
        os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"


def select_device_type(job_config) -> str:
    """`[training] device`: 'auto' (CUDA when present), 'cpu' or 'cuda'."""
    requested = job_config.training.device
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{origin_of(job_config, 'training', 'device')}: [training] device = 'cuda' "
            "but no CUDA device is available on this machine; use 'cpu' or 'auto'"
        )
    if requested == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def check_settings(job_config, device_type: str) -> None:
    """torchtitan keys that cannot act in this run are refused rather than ignored."""
    validation, training = job_config.validation, job_config.training
    if validation.enable and validation.seq_len > training.seq_len:
        raise ConfigError(
            f"{origin_of(job_config, 'validation', 'seq_len')}: [validation] seq_len = "
            f"{validation.seq_len} is longer than [training] seq_len = {training.seq_len}, "
            "the longest sequence the model's position table covers; set it <= "
            f"{training.seq_len}"
        )
    if device_type == "cpu" and job_config.profiling.enable_memory_snapshot:
        raise ConfigError(
            f"{origin_of(job_config, 'profiling', 'enable_memory_snapshot')}: "
            "[profiling] enable_memory_snapshot records the CUDA caching allocator's "
            "history; this run is on the CPU, which has none (use enable_profiling for "
            "a trace, or run on a GPU)"
        )


@dataclass
class BlockStats:
    """Steps and a running (EMA) CE per block, for the log."""

    steps: list[int]
    running_ce: list[float] = field(default_factory=list)
    decay: float = 0.9

    @classmethod
    def empty(cls, num_blocks: int) -> "BlockStats":
        return cls([0] * num_blocks, [math.nan] * num_blocks)

    def update(self, block: int, ce: float) -> None:
        self.steps[block] += 1
        previous = self.running_ce[block]
        self.running_ce[block] = ce if math.isnan(previous) else (
            self.decay * previous + (1 - self.decay) * ce
        )

    def as_metrics(self, unweighted_name: str) -> dict[str, float]:
        metrics = {}
        for b, (n, value) in enumerate(zip(self.steps, self.running_ce)):
            metrics[f"{BLOCKWISE_PREFIX}steps_block{b}"] = n
            if not math.isnan(value):
                metrics[f"{BLOCKWISE_PREFIX}running_{unweighted_name}_block{b}"] = value
        return metrics


@dataclass
class StepTotals:
    """Per-block sums of one step on this rank: unweighted loss, items, noise level
    (sigma, or t), samples."""

    sums_B4: torch.Tensor

    @classmethod
    def zeros(cls, num_rows: int, device) -> "StepTotals":
        return cls(torch.zeros(num_rows, 4, dtype=torch.float64, device=device))

    def add(self, row: int, unweighted_sum, num_items, level: torch.Tensor | None) -> None:
        """level: the step's noise levels (sigma or t), one per sample or one per
        token (any shape)."""
        level_sum = float(level.sum()) if level is not None else 0.0
        samples = level.numel() if level is not None else 0
        self.sums_B4[row] += torch.stack([
            unweighted_sum.detach().double(), num_items.double(),
            torch.tensor(level_sum, dtype=torch.float64, device=self.sums_B4.device),
            torch.tensor(float(samples), dtype=torch.float64, device=self.sums_B4.device),
        ])


class BlockwiseTrainer(Trainer):
    def __init__(self, job_config):
        device_type = select_device_type(job_config)
        check_settings(job_config, device_type)
        titan_compat.use_device(device_type)
        self.run_spec = resolve_run_spec(job_config)
        checkpoint_manager_cls = functools.partial(
            BlockwiseCheckpointManager,
            added_by_conversion=self.run_spec.family.added_by_conversion,
        )
        with titan_compat.trainer_overrides(
            job_config.model.name, self.run_spec.spec, checkpoint_manager_cls
        ):
            super().__init__(job_config)
        init_empty_optimizer_state(self.optimizers)  # resumable while a block is untrained

        self.model = self.model_parts[0]
        self.family, self.enabled = self.run_spec.family, self.run_spec.enabled
        self.layout = getattr(self.model, "block_parallel_layout", None)
        self.rank = dist.get_rank()
        section = job_config.diffusion_blocks
        if self.enabled:
            self.partition = self.model.partition
            self.num_blocks = self.partition.num_blocks
            self.block_schedule = build_block_schedule(
                section.block_schedule, self.num_blocks, job_config.training.steps,
                section.seed, section.block_weights,
            )
            check_sigma_per_token(job_config, self.model)
            self.block_stats = BlockStats.empty(self.num_blocks)
            self.metrics_processor.num_flops_per_token = blockwise_flops_per_token(
                self.model, job_config.training.seq_len, self.metrics_processor.num_flops_per_token
            )
        else:
            self.partition, self.num_blocks = None, 0
            self.block_schedule, self.block_stats = None, None
        self.block: int | None = None
        self.nonfinite_skips = 0  # steps skipped for a non-finite loss or gradient norm
        self.checkpointer.set_run(
            run_identity(job_config, self.partition, self.family),
            job_config.checkpoint.allow_fresh_start,
            self.metrics_processor.mark_restart,
            training_steps=job_config.training.steps,
        )
        # per-rank generators for noise levels (sigma or t; CPU, float64) and noise (on
        # the device)
        self.sigma_generator = torch.Generator().manual_seed(section.seed * 1000 + 1 + self.rank)
        self.noise_generator = torch.Generator(self.device).manual_seed(
            section.seed * 1000 + 2 + self.rank
        )
        self.log_layout()

    # -- construction ------------------------------------------------------

    def init_distributed(self):
        """torchtitan's (`[comm]`, NCCL or gloo, ParallelDims), with user mistakes as
        clear errors: a mesh that does not fit, parallelisms a block-wise step cannot
        use, batch sizes that do not divide."""
        try:
            parallel_dims = super().init_distributed()
        except AssertionError as e:
            world = os.environ.get("WORLD_SIZE", "?")
            raise ConfigError(
                f"[parallelism] does not fit {world} processes: {e}. The product of "
                "data_parallel_replicate_degree, data_parallel_shard_degree and the other "
                "degrees must equal the number of processes (-1 for dp_shard fills the rest)"
            ) from None
        try:
            check_supported_parallelism(parallel_dims)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        training = self.job_config.training
        dp = parallel_dims.get_mesh("batch").size() if parallel_dims.dp_enabled else 1
        if training.global_batch_size > 0 and training.global_batch_size % (training.local_batch_size * dp):
            raise ConfigError(
                f"{origin_of(self.job_config, 'training', 'global_batch_size')}: [training] "
                f"global_batch_size {training.global_batch_size} must be a multiple of "
                f"local_batch_size x data-parallel degree = {training.local_batch_size * dp}"
            )
        return parallel_dims

    def log_layout(self) -> None:
        config = self.job_config
        section = config.diffusion_blocks
        mode = (
            f"DiffusionBlocks B={self.num_blocks} ({section.block_schedule} schedule"
            f"{f' {section.block_weights}' if section.block_weights else ''}, "
            f"{section.partition} partition, overlap {section.overlap})"
            if self.enabled else "end-to-end (diffusion_blocks disabled)"
        )
        logger.info(
            f"{config.model.name} {config.model.flavor} as {type(self.model).__name__}: {mode}; "
            f"device {self.device}, world size {dist.get_world_size()}, "
            f"grad accumulation {self.gradient_accumulation_steps}"
        )
        if not self.enabled:
            return
        for b, layers in enumerate(self.partition.layer_ranges):
            lo, hi = self.partition.training_interval(b)
            params = layer_parameter_count(self.model, layers)
            logger.info(
                f"  block {b}: layers {layers.start}-{layers.stop - 1} ({params:,} params), "
                f"{self.partition.level_name} in [{lo:.4g}, {hi:.4g}]"
            )

    # -- checkpointed state ------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "enabled": self.enabled,
            "layer_counts": list(self.partition.layer_counts) if self.enabled else [],
            # per-rank generators under per-rank keys, as torchtitan does for dataloaders
            f"sigma_rng_rank{self.rank}": self.sigma_generator.get_state(),
            f"noise_rng_rank{self.rank}": self.noise_generator.get_state(),
            "nonfinite_skips": self.nonfinite_skips,
        })
        if self.enabled:
            state["block_schedule"] = self.block_schedule.state_dict()
            state["block_steps"] = list(self.block_stats.steps)
            state["block_running_ce"] = list(self.block_stats.running_ce)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("enabled") != self.enabled:
            raise ConfigError(
                "checkpoint was saved with [diffusion_blocks] enable = "
                f"{state.get('enabled')}, this run has enable = {self.enabled}"
            )
        if self.enabled:
            saved, ours = list(state["layer_counts"]), list(self.partition.layer_counts)
            if saved != ours:
                raise ConfigError(
                    f"checkpoint was saved with {len(saved)} blocks (layers per block "
                    f"{saved}); this run has num_blocks = {len(ours)} (layers per block "
                    f"{ours}). Resume with the same [diffusion_blocks] num_blocks / "
                    "layers_per_block, or start a new dump_folder"
                )
            self.block_schedule.load_state_dict(state["block_schedule"])
            self.block_stats.steps = list(state["block_steps"])
            self.block_stats.running_ce = list(state["block_running_ce"])
        super().load_state_dict(state)
        self.nonfinite_skips = state["nonfinite_skips"]
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

    def batch_generator(self, data_iterable):
        """torchtitan's, except that running out of data stops the run with an error.
        torchtitan ends the run there as if it were done (a warning, exit 0, no
        checkpoint of the steps since the last interval save). The text and image
        datasets re-loop; only a finite dataloader gets here."""
        try:
            yield from super().batch_generator(data_iterable)
        except DataloaderExhaustedError:
            training = self.job_config.training
            raise ConfigError(
                f"{origin_of(self.job_config, 'training', 'steps')}: the training data ran "
                f"out at step {self.step} of [training] steps = {training.steps} "
                f"([training] dataset {training.dataset!r} is finite); step {self.step} was "
                "not trained and nothing after the last checkpoint was saved. Lower "
                "[training] steps or give the dataloader more data"
            ) from None

    def post_dataloading_process(self, input_dict, labels):
        if self.enabled:  # the denoiser builds its own [clean ; noisy] attention mask
            return input_dict["input"], labels, {}, {}
        return super().post_dataloading_process(input_dict, labels)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        """The task's loss sum over this microbatch, divided by the global item count
        (torchtitan's convention), backward; returns the detached scaled loss."""
        _, labels, _, extra_kwargs = self.post_dataloading_process(input_dict, labels)
        task = self.family.task
        level = None
        with self.train_context():
            with self.maybe_enable_amp:
                if self.enabled:
                    level = self.partition.sample_training_levels(
                        self.block, self.level_shape(labels), self.sigma_generator
                    )
                    sums = task.denoiser_loss(
                        self.model, input_dict, labels, self.block,
                        level.to(self.device, torch.float32), self.noise_generator,
                    )
                else:
                    sums = task.end_to_end_loss(
                        self.model, input_dict, labels, extra_kwargs, self.noise_generator
                    )
                loss = sums.loss_sum / global_valid_tokens
            loss.backward()
        self.step_totals.add(self.block or 0, sums.unweighted_sum, sums.num_items, level)
        return loss.detach()

    def level_shape(self, labels: torch.Tensor) -> tuple[int, ...]:
        """One noise level per sample (B,), or with `sigma_per_token` one per label
        token (B, T) (check_sigma_per_token made sure the model takes them)."""
        if self.job_config.diffusion_blocks.sigma_per_token:
            return tuple(labels.shape[:2])
        return tuple(labels.shape[:1])

    def normalisation_mesh(self):
        """Ranks whose items a loss is divided by: the data-parallel ranks, or in a
        block-parallel run the ranks of this rank's group."""
        if self.layout is not None:
            return self.layout.mesh["group_shard"]
        return self.parallel_dims.get_mesh("batch") if self.parallel_dims.dp_enabled else None

    def clip_gradients(self) -> torch.Tensor:
        max_norm = self.job_config.training.max_norm
        if self.layout is not None:
            return block_parallel.clip_grad_norm_block_parallel(self.model, self.layout, max_norm)
        return dist_utils.clip_grad_norm_(
            [p for m in self.model_parts for p in m.parameters()], max_norm, foreach=True,
            pp_mesh=self.parallel_dims.get_optional_mesh("pp"),
            ep_enabled=self.parallel_dims.ep_enabled,
        )

    def train_step(self, data_iterator) -> None:
        self.optimizers.zero_grad()  # set_to_none: inactive blocks keep grad None
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        self.block = self.choose_block() if self.enabled else None
        self.step_totals = StepTotals.zeros(max(self.num_blocks, 1), self.device)

        microbatches = []
        local_items = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            local_items += (labels != IGNORE_INDEX).sum()
            microbatches.append((input_dict, labels))
        local_items = local_items.to(self.device)
        mesh = self.normalisation_mesh()
        global_items = dist_utils.dist_sum(local_items, mesh) if mesh is not None else local_items
        global_items = torch.as_tensor(global_items, dtype=torch.float32, device=self.device)

        losses = []
        for input_dict, labels in microbatches:
            input_dict = {k: v.to(self.device) for k, v in input_dict.items()}
            losses.append(self.forward_backward_step(
                input_dict=input_dict, labels=labels.to(self.device),
                global_valid_tokens=global_items,
            ))

        grad_norm = self.clip_gradients()
        problem = self.nonfinite_problem(losses, grad_norm)
        if problem is None:
            self.checkpointer.maybe_wait_for_staging()
            self.optimizers.step()
            self.lr_schedulers.step()
            step_metrics = self.update_block_stats()
        else:
            self.handle_nonfinite_step(problem)  # skips the step, or raises

        if self.layout is not None and (self.checkpoint_due() or self.validation_due()):
            # every rank needs every block's current weights to save or validate
            block_parallel.synchronize_blocks(self.model, self.optimizers, self.layout)
        if problem is not None or not self.metrics_processor.should_log(self.step):
            return
        self.log_step(torch.sum(torch.stack(losses)), local_items, global_items, grad_norm,
                      lr, step_metrics)

    def nonfinite_problem(self, losses, grad_norm) -> str | None:
        """What is not finite at this step (the same answer on every rank), or None.

        The loss of every block trained at this step (a block-parallel step trains
        all of them) is summed over the ranks, so a non-finite loss on any rank is
        seen by all; the gradient norm is already global."""
        loss_per_block = torch.zeros(max(self.num_blocks, 1), dtype=torch.float64, device=self.device)
        loss_per_block[self.block or 0] = torch.stack(losses).sum().double()
        if dist.get_world_size() > 1:
            dist.all_reduce(loss_per_block, op=dist.ReduceOp.SUM)
        losses_B = loss_per_block.tolist()
        bad_losses = [b for b, x in enumerate(losses_B) if not math.isfinite(x)]
        norm = float(grad_norm)
        if not bad_losses and math.isfinite(norm):
            return None
        trained = list(range(self.num_blocks)) if self.layout is not None else [self.block]
        what = []
        if bad_losses:
            what.append(f"the loss is {', '.join(str(losses_B[b]) for b in bad_losses)}")
            trained = bad_losses if self.enabled else trained
        if not math.isfinite(norm):
            what.append(f"the gradient norm is {norm}")
        return f"step {self.step}: {' and '.join(what)} on {self.describe_blocks(trained)}"

    def describe_blocks(self, blocks: list[int | None]) -> str:
        """'block 2 (layers 4-5, sigma in [0.18, 0.51])' (t for MD4), or the end-to-end model."""
        if not self.enabled:
            return "the end-to-end model"
        parts = []
        for block in blocks:
            layers = self.partition.layer_ranges[block]
            lo, hi = self.partition.training_interval(block)
            parts.append(
                f"block {block} (layers {layers.start}-{layers.stop - 1}, "
                f"{self.partition.level_name} in [{lo:.4g}, {hi:.4g}])"
            )
        return ", ".join(parts)

    def handle_nonfinite_step(self, problem: str) -> None:
        """`[diffusion_blocks] on_nonfinite`: 'stop' raises; 'skip' drops the gradients,
        so neither the optimizer nor the LR schedule steps (the step counter, this
        step's batch and block draw are used up), until more than
        `max_nonfinite_skips` steps of the run were skipped."""
        section = self.job_config.diffusion_blocks
        advice = (
            "nothing was stepped at this step and nothing non-finite was saved. Lower "
            "[optimizer] lr or [training] max_norm (or set [diffusion_blocks] "
            "on_nonfinite = 'skip') and resume from the last checkpoint"
        )
        if section.on_nonfinite == "stop":
            raise FloatingPointError(
                f"{problem}: stopped ([diffusion_blocks] on_nonfinite = 'stop'); {advice}"
            )
        self.nonfinite_skips += 1
        if self.nonfinite_skips > section.max_nonfinite_skips:
            raise FloatingPointError(
                f"{problem}: stopped, that is {self.nonfinite_skips} non-finite steps in "
                f"this run, more than [diffusion_blocks] max_nonfinite_skips = "
                f"{section.max_nonfinite_skips}; {advice}"
            )
        self.optimizers.zero_grad()
        logger.warning(
            f"{problem}: step skipped ({self.nonfinite_skips} of at most "
            f"{section.max_nonfinite_skips}); the optimizer and the LR schedule did not step"
        )
        self.metrics_processor.log_event(
            self.step, "nonfinite_skip", problem=problem, skips=self.nonfinite_skips
        )

    def update_block_stats(self) -> dict[str, float]:
        """Sum this step's per-block totals over all ranks; update the per-block stats."""
        totals = self.step_totals.sums_B4
        if dist.get_world_size() > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        unweighted, items, level_sum, samples = totals.sum(0).tolist()
        metrics = {f"{BLOCKWISE_PREFIX}{self.family.task.unweighted_name}": unweighted / max(items, 1)}
        if not self.enabled:
            return metrics
        for block, (ce_sum, n, _, _) in enumerate(totals.tolist()):
            if n > 0:
                self.block_stats.update(block, ce_sum / n)
        if self.layout is None:
            metrics[f"{BLOCKWISE_PREFIX}block"] = self.block
        # the mean noise level: diffusion_blocks/sigma_mean, or t_mean for MD4
        metrics[f"{BLOCKWISE_PREFIX}{self.partition.level_name}_mean"] = level_sum / max(samples, 1)
        return metrics

    def log_step(self, loss, local_items, global_items, grad_norm, lr, step_metrics) -> None:
        """torchtitan's loss reduction (global mean and max of the ranks' means) and its
        metrics processor, with the per-block figures as extra metrics."""
        if self.parallel_dims.dp_cp_enabled:
            loss_mesh = self.parallel_dims.get_optional_mesh("loss")
            groups = self.layout.num_blocks if self.layout is not None else 1
            global_avg_loss = dist_utils.dist_sum(loss, loss_mesh) / groups
            global_max_loss = dist_utils.dist_max(loss * global_items / local_items, loss_mesh)
            ntokens_seen = dist_utils.dist_sum(
                torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device), loss_mesh
            )
        else:
            global_avg_loss = global_max_loss = loss.item()
            ntokens_seen = self.ntokens_seen
        extra = {"n_tokens_seen": ntokens_seen, "lr": lr, **step_metrics}
        if self.enabled:
            extra.update(self.block_stats.as_metrics(self.family.task.unweighted_name))
        self.metrics_processor.log(
            self.step, global_avg_loss, global_max_loss, grad_norm.item(), extra_metrics=extra
        )

    def checkpoint_due(self) -> bool:
        checkpoint = self.job_config.checkpoint
        last = self.step == self.job_config.training.steps
        return checkpoint.enable and (
            last or self.step % checkpoint.interval == 0
            or (self.step == 1 and checkpoint.enable_first_step_checkpoint)
        )

    def validation_due(self) -> bool:
        return self.job_config.validation.enable and self.validator.should_validate(self.step)


def check_sigma_per_token(job_config, model) -> None:
    """`sigma_per_token` needs a model that conditions each row on its own sigma (it
    says so with `sigma_per_token = True`, set from the same config key)."""
    if job_config.diffusion_blocks.sigma_per_token and not getattr(model, "sigma_per_token", False):
        raise ConfigError(
            f"{origin_of(job_config, 'diffusion_blocks', 'sigma_per_token')}: [diffusion_blocks] "
            f"sigma_per_token needs a token-sequence denoiser (dblocks_llama3); "
            f"{type(model).__name__} takes one sigma per sample"
        )


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


def blockwise_flops_per_token(model, seq_len: int, end_to_end_flops: int) -> int:
    """FLOPs per item of one block-wise training step, for torchtitan's TFLOPS and MFU.

    A step runs one block's layers instead of all of them: the layers' share of the
    end-to-end figure shrinks by the block's share of the layer parameters (on average
    1/B); the LM's 2T sequence doubles the layers' work per label token. Shared modules
    (embedding, head) count in full."""
    layer_params = sum(p.numel() for p in model.layers.parameters())
    all_params = sum(p.numel() for p in model.parameters())
    if layer_params == 0 or end_to_end_flops <= 0:
        return end_to_end_flops
    tokens_per_item = getattr(model, "TOKENS_PER_LABEL", 1)
    layer_share = layer_params / all_params
    blocks = model.partition.num_blocks
    scaled = end_to_end_flops * ((1 - layer_share) + layer_share * tokens_per_item / blocks)
    return int(scaled)


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    """What torchtitan's `main(TrainerClass)` does (train, or write a seed checkpoint;
    close; destroy the process group), with our composable, checked config."""
    init_logger()
    use_single_process_env()
    job_config = parse_job_config(argv, reads_data=True)
    lock = DumpFolderLock.take(job_config)  # rank 0: one run per dump folder
    trainer = None
    try:
        trainer = BlockwiseTrainer(job_config)
        if job_config.comm.mode == "local_tensor":
            logger.info("Local tensor mode enabled - skipping training execution")
            return
        if job_config.checkpoint.create_seed_checkpoint:
            if dist.get_world_size() != 1 or not job_config.checkpoint.enable:
                raise ConfigError(
                    f"{origin_of(job_config, 'checkpoint', 'create_seed_checkpoint')}: a seed "
                    "checkpoint is written by ONE process with [checkpoint] enable = true "
                    f"(this run: {dist.get_world_size()} processes, enable = "
                    f"{job_config.checkpoint.enable})"
                )
            trainer.checkpointer.save(curr_step=0, last_step=True)
            logger.info("Created seed checkpoint")
            return
        trainer.train()
        if trainer.enabled:
            logger.info(f"Training done: steps per block {trainer.block_stats.steps}")
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        lock.release()


if __name__ == "__main__":
    main()
