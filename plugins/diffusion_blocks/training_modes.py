"""The three ways `BlockwiseTrainer` trains a model, one class each:

- `EndToEnd` (`[diffusion_blocks] enable = false`): the twin's plain loss over every layer;
- `OneBlockPerStep`: each step trains ONE block, chosen by the block schedule
  identically on every rank; each sample draws its noise level from that block's
  widened interval;
- `BlockParallel` (`[diffusion_blocks] block_parallel`): the processes form B groups and
  group g trains block g at every step.

The trainer asks its mode for what differs between them (which block a step trains,
the loss, the ranks a loss is normalised over, gradient clipping, the extra
checkpointed state, the per-block metrics); everything else is torchtitan's."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from torchtitan.distributed import utils as dist_utils

from .components.dist_utils import layer_parameter_count
from .components.metrics import BLOCKWISE_PREFIX
from .diffusion.schedules import build_block_schedule
from .errors import ConfigError, origin_of
from .parallel import block_parallel


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


@dataclass(frozen=True)
class Generators:
    """Per-rank generators: noise levels (sigma or t; CPU, float64) and noise (device)."""

    level: torch.Generator
    noise: torch.Generator


def torchtitan_clip(model_parts, parallel_dims, max_norm: float) -> torch.Tensor:
    return dist_utils.clip_grad_norm_(
        [p for m in model_parts for p in m.parameters()], max_norm, foreach=True,
        pp_mesh=parallel_dims.get_optional_mesh("pp"), ep_enabled=parallel_dims.ep_enabled,
    )


class EndToEnd:
    """The end-to-end twin: every layer, the task's plain loss."""

    enabled = False
    partition = None
    layout = None
    block_schedule = None
    block_stats = None
    num_blocks = 0
    builds_own_attention_mask = False  # torchtitan's post-dataloading applies
    loss_groups = 1                    # loss reduction: one model, no block groups

    def describe(self, section) -> str:
        return "end-to-end (diffusion_blocks disabled)"

    def layer_lines(self, model) -> list[str]:
        return []

    def flops_per_token(self, model, seq_len: int, end_to_end_flops: int) -> int:
        return end_to_end_flops

    def block_for_step(self, step: int, device) -> int | None:
        return None

    def loss_sums(self, task, model, input_dict, labels, extra_kwargs, block, generators):
        """(the task's LossSums, the noise levels drawn or None)."""
        sums = task.end_to_end_loss(model, input_dict, labels, extra_kwargs, generators.noise)
        return sums, None

    def normalisation_mesh(self, parallel_dims):
        """Ranks whose items a loss is divided by: the data-parallel ranks."""
        return parallel_dims.get_mesh("batch") if parallel_dims.dp_enabled else None

    def clip_gradients(self, model, model_parts, parallel_dims, max_norm: float) -> torch.Tensor:
        return torchtitan_clip(model_parts, parallel_dims, max_norm)

    def synchronize(self, model, optimizers, needed: bool) -> None:
        """Make every rank hold every block's current weights (when `needed`)."""

    def trained_blocks(self, block: int | None) -> list[int | None]:
        return [block]

    def blocks_with_bad_loss(self, bad_rows: list[int], trained: list[int | None]) -> list[int | None]:
        return trained

    def describe_blocks(self, blocks: list[int | None]) -> str:
        return "the end-to-end model"

    def step_metrics(self, totals_B4: torch.Tensor, block: int | None, unweighted_name: str) -> dict:
        """This step's metrics from its per-block totals summed over the ranks."""
        unweighted, items, _, _ = totals_B4.sum(0).tolist()
        return {f"{BLOCKWISE_PREFIX}{unweighted_name}": unweighted / max(items, 1)}

    def running_metrics(self, unweighted_name: str) -> dict:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": False, "layer_counts": []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_enabled_matches(state, self.enabled)

    def summary(self) -> str | None:
        return None


class OneBlockPerStep(EndToEnd):
    """Each step trains the block the schedule picks (rank 0's pick, broadcast)."""

    enabled = True
    builds_own_attention_mask = True  # the denoiser builds its [clean ; noisy] mask

    def __init__(self, partition, block_schedule, sigma_per_token: bool):
        self.partition = partition
        self.num_blocks = partition.num_blocks
        self.block_schedule = block_schedule
        self.block_stats = BlockStats.empty(self.num_blocks)
        self.sigma_per_token = sigma_per_token

    def describe(self, section) -> str:
        weights = f" {section.block_weights}" if section.block_weights else ""
        return (
            f"DiffusionBlocks B={self.num_blocks} ({section.block_schedule} schedule{weights}, "
            f"{section.partition} partition, overlap {section.overlap})"
        )

    def layer_lines(self, model) -> list[str]:
        lines = []
        for b, layers in enumerate(self.partition.layer_ranges):
            lo, hi = self.partition.training_interval(b)
            lines.append(
                f"  block {b}: layers {layers.start}-{layers.stop - 1} "
                f"({layer_parameter_count(model, layers):,} params), "
                f"{self.partition.level_name} in [{lo:.4g}, {hi:.4g}]"
            )
        return lines

    def flops_per_token(self, model, seq_len: int, end_to_end_flops: int) -> int:
        return blockwise_flops_per_token(model, seq_len, end_to_end_flops)

    def block_for_step(self, step: int, device) -> int:
        block = self.block_schedule.block_for_step(step)
        if dist.get_world_size() > 1:
            # all ranks hold the same generator; rank 0's choice is authoritative
            chosen = torch.tensor([block], dtype=torch.int64, device=device)
            dist.broadcast(chosen, src=0)
            block = int(chosen.item())
        return block

    def level_shape(self, labels: torch.Tensor) -> tuple[int, ...]:
        """One noise level per sample (B,), or with `sigma_per_token` one per label
        token (B, T) (check_sigma_per_token made sure the model takes them)."""
        return tuple(labels.shape[:2]) if self.sigma_per_token else tuple(labels.shape[:1])

    def loss_sums(self, task, model, input_dict, labels, extra_kwargs, block, generators):
        level = self.partition.sample_training_levels(block, self.level_shape(labels), generators.level)
        sums = task.denoiser_loss(
            model, input_dict, labels, block, level.to(labels.device, torch.float32), generators.noise,
        )
        return sums, level

    def blocks_with_bad_loss(self, bad_rows, trained):
        return bad_rows  # a row of the loss totals is a block

    def describe_blocks(self, blocks: list[int | None]) -> str:
        """'block 2 (layers 4-5, sigma in [0.18, 0.51])' (t for MD4)."""
        parts = []
        for block in blocks:
            layers = self.partition.layer_ranges[block]
            lo, hi = self.partition.training_interval(block)
            parts.append(
                f"block {block} (layers {layers.start}-{layers.stop - 1}, "
                f"{self.partition.level_name} in [{lo:.4g}, {hi:.4g}])"
            )
        return ", ".join(parts)

    def step_metrics(self, totals_B4, block, unweighted_name):
        metrics = super().step_metrics(totals_B4, block, unweighted_name)
        for b, (ce_sum, n, _, _) in enumerate(totals_B4.tolist()):
            if n > 0:
                self.block_stats.update(b, ce_sum / n)
        metrics.update(self.block_metric(block))
        # the mean noise level: diffusion_blocks/sigma_mean, or t_mean for MD4
        _, _, level_sum, samples = totals_B4.sum(0).tolist()
        metrics[f"{BLOCKWISE_PREFIX}{self.partition.level_name}_mean"] = level_sum / max(samples, 1)
        return metrics

    def block_metric(self, block: int) -> dict:
        return {f"{BLOCKWISE_PREFIX}block": block}

    def running_metrics(self, unweighted_name: str) -> dict:
        return self.block_stats.as_metrics(unweighted_name)

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "layer_counts": list(self.partition.layer_counts),
            "block_schedule": self.block_schedule.state_dict(),
            "block_steps": list(self.block_stats.steps),
            "block_running_ce": list(self.block_stats.running_ce),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_enabled_matches(state, self.enabled)
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

    def summary(self) -> str:
        return f"Training done: steps per block {self.block_stats.steps}"


class BlockParallel(OneBlockPerStep):
    """Group g of the B process groups trains block g at every step; only the shared
    modules are synchronised across groups (parallel/block_parallel.py)."""

    def __init__(self, partition, block_schedule, sigma_per_token: bool, layout):
        super().__init__(partition, block_schedule, sigma_per_token)
        self.layout = layout
        self.loss_groups = layout.num_blocks

    def block_for_step(self, step: int, device) -> int:
        return self.layout.group

    def normalisation_mesh(self, parallel_dims):
        """The ranks of this rank's group."""
        return self.layout.mesh["group_shard"]

    def clip_gradients(self, model, model_parts, parallel_dims, max_norm):
        return block_parallel.clip_grad_norm_block_parallel(model, self.layout, max_norm)

    def synchronize(self, model, optimizers, needed: bool) -> None:
        if needed:
            block_parallel.synchronize_blocks(model, optimizers, self.layout)

    def trained_blocks(self, block):
        return list(range(self.num_blocks))

    def block_metric(self, block):
        return {}  # every block trains at every step


def build_training_mode(job_config, model, enabled: bool) -> EndToEnd:
    """The mode a job config trains in (its model already built and parallelised)."""
    if not enabled:
        return EndToEnd()
    section = job_config.diffusion_blocks
    check_sigma_per_token(job_config, model)
    schedule = build_block_schedule(
        section.block_schedule, model.partition.num_blocks, job_config.training.steps,
        section.seed, section.block_weights,
    )
    layout = getattr(model, "block_parallel_layout", None)
    if layout is not None:
        return BlockParallel(model.partition, schedule, section.sigma_per_token, layout)
    return OneBlockPerStep(model.partition, schedule, section.sigma_per_token)


def check_enabled_matches(state: dict[str, Any], enabled: bool) -> None:
    if state.get("enabled") != enabled:
        raise ConfigError(
            "checkpoint was saved with [diffusion_blocks] enable = "
            f"{state.get('enabled')}, this run has enable = {enabled}"
        )


def check_sigma_per_token(job_config, model) -> None:
    """`sigma_per_token` needs a model that conditions each row on its own sigma (it
    says so with `sigma_per_token = True`, set from the same config key)."""
    if job_config.diffusion_blocks.sigma_per_token and not getattr(model, "sigma_per_token", False):
        raise ConfigError(
            f"{origin_of(job_config, 'diffusion_blocks', 'sigma_per_token')}: [diffusion_blocks] "
            f"sigma_per_token needs a token-sequence denoiser (dblocks_llama3); "
            f"{type(model).__name__} takes one sigma per sample"
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
