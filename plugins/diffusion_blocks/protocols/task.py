"""The task protocol: how a model family turns a batch into a loss, with and without
DiffusionBlocks. Each family's task lives in its folder (models/<family>/task.py).

A task keeps the train loop free of per-architecture if-chains: the loop picks the
block and each sample's noise level (drawn by the partition's noise process: EDM's
sigma, or MD4's masking time t; one per sample, shape (B,), or with `[diffusion_blocks]
sigma_per_token` one per label token, (B, T), for models that say `sigma_per_token`),
the task noises the target, runs the model and scores it. Losses
are sums over the microbatch's items with their count (objectives.LossSums); the loop
divides by the global item count, as torchtitan does.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..diffusion.objectives import LossSums

EVAL_SEED = 1234  # the generator seed of evaluation-time sampling


@dataclass
class EvalContext:
    """What a task's optional `evaluate(model, ctx) -> {name: value}` gets.

    Called by the family's validator (model in eval mode, under no_grad, on every
    rank: FSDP needs every rank in every forward) when `[validation] enable = true`,
    at torchtitan's validation steps; the returned scalars are logged. Anything else
    (images) the task writes itself: TensorBoard writers are in `metric_logger`.
    """

    job_config: Any
    step: int
    device: torch.device
    dp_rank: int
    dp_degree: int
    metric_logger: Any  # torchtitan's logger (LoggerContainer or BaseLogger)


class Task(Protocol):
    unweighted_name: str  # what LossSums.unweighted_sum sums: "ce" or "mse"

    def denoiser_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
        block: int, level_B: torch.Tensor, generator: torch.Generator,
    ) -> LossSums:
        """level_B: each sample's noise level (sigma, or t), float32 on the device."""

    def end_to_end_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
        extra_kwargs: dict[str, Any], generator: torch.Generator,
    ) -> LossSums: ...
