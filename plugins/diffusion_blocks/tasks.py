"""How each model family turns a batch into a loss, with and without DiffusionBlocks.

A task keeps the train loop free of per-architecture if-chains: the loop picks the
block and the sigmas, the task noises the target, runs the model and scores it.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .objectives import per_sample_cross_entropy, weighted_cross_entropy


@dataclass
class StepLoss:
    loss: torch.Tensor            # what backward() sees
    unweighted: torch.Tensor      # the plain CE / MSE, for logging
    num_items: int                # tokens or images, for throughput


@dataclass
class EvalContext:
    """What a task's optional `evaluate(model, ctx) -> {name: value}` gets from the loop.

    The loop calls it (model in eval mode, under no_grad, on every rank: FSDP needs
    every rank in every forward) every `[validation] freq` steps and after the last
    step when `[validation] enable = true`, and logs the returned scalars. Anything
    else (images) the task writes itself: TensorBoard writers are in `metric_logger`.
    """

    job_config: Any
    step: int
    device: torch.device
    dp_rank: int
    dp_degree: int
    metric_logger: Any  # torchtitan's logger (LoggerContainer or BaseLogger)


class Task(Protocol):
    def denoiser_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
        block: int, sigma_B: torch.Tensor, generator: torch.Generator,
    ) -> StepLoss: ...

    def end_to_end_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
        extra_kwargs: dict[str, Any], generator: torch.Generator,
    ) -> StepLoss: ...


class LanguageModelTask:
    """Autoregressive LM: noisy rows denoise the next tokens' normalised embeddings."""

    def denoiser_loss(self, model, inputs, labels, block, sigma_B, generator):
        tokens_BT = inputs["input"]
        dim = model.tok_embeddings.weight.shape[-1]
        noise_BTD = torch.randn(
            (*labels.shape, dim), generator=generator, device=labels.device
        )
        logits = model(tokens_BT, labels, block=block, sigma_B=sigma_B, noise_BTD=noise_BTD)
        loss, ce = weighted_cross_entropy(
            logits, labels, sigma_B, model.partition.schedule.sigma_data
        )
        return StepLoss(loss, ce, labels.numel())

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        logits = model(inputs["input"], **extra_kwargs)
        ce = per_sample_cross_entropy(logits, labels).mean()
        return StepLoss(ce, ce.detach(), labels.numel())
