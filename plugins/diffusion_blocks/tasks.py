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
