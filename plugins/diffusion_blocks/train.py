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
from dataclasses import dataclass
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
from .components.dump_lock import DumpFolderLock
from .components.run_identity import run_identity
from .components.subnormals import flush_subnormals
from .config.loader import parse_job_config
from .config.checks import check_validation_seq_len
from .errors import ConfigError, exit_on_config_error, origin_of
from .parallel.fsdp import check_supported_parallelism
from .registry import resolve_run_spec
from .training_modes import build_training_mode, Generators

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
    if job_config.validation.enable:
        check_validation_seq_len(job_config)
    if device_type == "cpu" and job_config.profiling.enable_memory_snapshot:
        raise ConfigError(
            f"{origin_of(job_config, 'profiling', 'enable_memory_snapshot')}: "
            "[profiling] enable_memory_snapshot records the CUDA caching allocator's "
            "history; this run is on the CPU, which has none (use enable_profiling for "
            "a trace, or run on a GPU)"
        )


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
        flush_subnormals(device_type)
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
        self.family = self.run_spec.family
        self.mode = build_training_mode(job_config, self.model, self.run_spec.enabled)
        self.rank = dist.get_rank()
        self.metrics_processor.num_flops_per_token = self.mode.flops_per_token(
            self.model, job_config.training.seq_len, self.metrics_processor.num_flops_per_token
        )
        self.block: int | None = None
        self.nonfinite_skips = 0  # steps skipped for a non-finite loss or gradient norm
        self.checkpointer.set_run(
            run_identity(job_config, self.mode.partition, self.family),
            job_config.checkpoint.allow_fresh_start,
            self.metrics_processor.mark_restart,
            training_steps=job_config.training.steps,
        )
        seed = job_config.diffusion_blocks.seed
        self.generators = Generators(
            level=torch.Generator().manual_seed(seed * 1000 + 1 + self.rank),
            noise=torch.Generator(self.device).manual_seed(seed * 1000 + 2 + self.rank),
        )
        self.log_layout()

    # what tests and tools read of the mode
    enabled = property(lambda self: self.mode.enabled)
    partition = property(lambda self: self.mode.partition)
    num_blocks = property(lambda self: self.mode.num_blocks)
    layout = property(lambda self: self.mode.layout)
    block_schedule = property(lambda self: self.mode.block_schedule)
    block_stats = property(lambda self: self.mode.block_stats)
    sigma_generator = property(lambda self: self.generators.level)
    noise_generator = property(lambda self: self.generators.noise)

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
        logger.info(
            f"{config.model.name} {config.model.flavor} as {type(self.model).__name__}: "
            f"{self.mode.describe(config.diffusion_blocks)}; "
            f"device {self.device}, world size {dist.get_world_size()}, "
            f"grad accumulation {self.gradient_accumulation_steps}"
        )
        for line in self.mode.layer_lines(self.model):
            logger.info(line)

    # -- checkpointed state ------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(self.mode.state_dict())
        state.update({
            # per-rank generators under per-rank keys, as torchtitan does for dataloaders
            f"sigma_rng_rank{self.rank}": self.generators.level.get_state(),
            f"noise_rng_rank{self.rank}": self.generators.noise.get_state(),
            "nonfinite_skips": self.nonfinite_skips,
        })
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode.load_state_dict(state)
        super().load_state_dict(state)
        self.nonfinite_skips = state["nonfinite_skips"]
        for key, generator in (
            (f"sigma_rng_rank{self.rank}", self.generators.level),
            (f"noise_rng_rank{self.rank}", self.generators.noise),
        ):
            if key in state:
                generator.set_state(state[key])

    # -- one step ------------------------------------------------------------

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
        if self.mode.builds_own_attention_mask:
            return input_dict["input"], labels, {}, {}
        return super().post_dataloading_process(input_dict, labels)

    def forward_backward_step(self, *, input_dict, labels, global_valid_tokens):
        """The task's loss sum over this microbatch, divided by the global item count
        (torchtitan's convention), backward; returns the detached scaled loss."""
        _, labels, _, extra_kwargs = self.post_dataloading_process(input_dict, labels)
        with self.train_context():
            with self.maybe_enable_amp:
                sums, level = self.mode.loss_sums(
                    self.family.task, self.model, input_dict, labels, extra_kwargs,
                    self.block, self.generators,
                )
                loss = sums.loss_sum / global_valid_tokens
            loss.backward()
        self.step_totals.add(self.block or 0, sums.unweighted_sum, sums.num_items, level)
        return loss.detach()

    def clip_gradients(self) -> torch.Tensor:
        return self.mode.clip_gradients(
            self.model, self.model_parts, self.parallel_dims, self.job_config.training.max_norm
        )

    def train_step(self, data_iterator) -> None:
        self.optimizers.zero_grad()  # set_to_none: inactive blocks keep grad None
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        self.block = self.mode.block_for_step(self.step, self.device)
        self.step_totals = StepTotals.zeros(max(self.mode.num_blocks, 1), self.device)

        microbatches = []
        local_items = torch.tensor(0, dtype=torch.int64)
        for _ in range(self.gradient_accumulation_steps):
            input_dict, labels = next(data_iterator)
            local_items += (labels != IGNORE_INDEX).sum()
            microbatches.append((input_dict, labels))
        local_items = local_items.to(self.device)
        mesh = self.mode.normalisation_mesh(self.parallel_dims)
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

        # every rank needs every block's current weights to save or validate
        self.mode.synchronize(
            self.model, self.optimizers, self.checkpoint_due() or self.validation_due()
        )
        if problem is not None or not self.metrics_processor.should_log(self.step):
            return
        self.log_step(torch.sum(torch.stack(losses)), local_items, global_items, grad_norm,
                      lr, step_metrics)

    def nonfinite_problem(self, losses, grad_norm) -> str | None:
        """What is not finite at this step (the same answer on every rank), or None.

        The loss of every block trained at this step (a block-parallel step trains
        all of them) is summed over the ranks, so a non-finite loss on any rank is
        seen by all; the gradient norm is already global."""
        loss_per_block = torch.zeros(max(self.mode.num_blocks, 1), dtype=torch.float64, device=self.device)
        loss_per_block[self.block or 0] = torch.stack(losses).sum().double()
        if dist.get_world_size() > 1:
            dist.all_reduce(loss_per_block, op=dist.ReduceOp.SUM)
        losses_B = loss_per_block.tolist()
        bad_losses = [b for b, x in enumerate(losses_B) if not math.isfinite(x)]
        norm = float(grad_norm)
        if not bad_losses and math.isfinite(norm):
            return None
        trained = self.mode.trained_blocks(self.block)
        what = []
        if bad_losses:
            what.append(f"the loss is {', '.join(str(losses_B[b]) for b in bad_losses)}")
            trained = self.mode.blocks_with_bad_loss(bad_losses, trained)
        if not math.isfinite(norm):
            what.append(f"the gradient norm is {norm}")
        return f"step {self.step}: {' and '.join(what)} on {self.mode.describe_blocks(trained)}"

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
        return self.mode.step_metrics(totals, self.block, self.family.task.unweighted_name)

    def log_step(self, loss, local_items, global_items, grad_norm, lr, step_metrics) -> None:
        """torchtitan's loss reduction (global mean and max of the ranks' means) and its
        metrics processor, with the per-block figures as extra metrics."""
        if self.parallel_dims.dp_cp_enabled:
            loss_mesh = self.parallel_dims.get_optional_mesh("loss")
            global_avg_loss = dist_utils.dist_sum(loss, loss_mesh) / self.mode.loss_groups
            global_max_loss = dist_utils.dist_max(loss * global_items / local_items, loss_mesh)
            ntokens_seen = dist_utils.dist_sum(
                torch.tensor(self.ntokens_seen, dtype=torch.int64, device=self.device), loss_mesh
            )
        else:
            global_avg_loss = global_max_loss = loss.item()
            ntokens_seen = self.ntokens_seen
        extra = {"n_tokens_seen": ntokens_seen, "lr": lr, **step_metrics,
                 **self.mode.running_metrics(self.family.task.unweighted_name)}
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
        if trainer.mode.summary() is not None:
            logger.info(trainer.mode.summary())
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        lock.release()


if __name__ == "__main__":
    main()
