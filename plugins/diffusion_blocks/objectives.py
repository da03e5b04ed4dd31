"""Training losses: w(sigma)-weighted cross-entropy for discrete targets (tokens,
classes) and w(sigma)-weighted squared error for continuous ones (images)."""

from functools import partial

import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from .diffusion import loss_weight


def per_sample_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean CE over each sample's valid positions, shape (B,)."""
    ce_BT = F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), labels_BT.flatten(0, 1),
        reduction="none", ignore_index=IGNORE_INDEX,
    ).view(labels_BT.shape)
    valid_BT = (labels_BT != IGNORE_INDEX).float()
    return (ce_BT * valid_BT).sum(1) / valid_BT.sum(1).clamp_min(1.0)


def weighted_cross_entropy(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, sigma_B: torch.Tensor,
    sigma_data: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w(sigma) * CE).mean() and the unweighted mean CE (for logging)."""
    ce_B = per_sample_cross_entropy(logits_BTV, labels_BT)
    weight_B = loss_weight(sigma_B.to(ce_B.dtype), sigma_data)
    return (weight_B * ce_B).mean(), ce_B.mean().detach()


def weighted_squared_error(
    denoised: torch.Tensor, target: torch.Tensor, sigma_B: torch.Tensor,
    sigma_data: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w(sigma) * ||D - y||^2 / dims).mean() and the unweighted mean squared error."""
    se_B = (denoised.float() - target.float()).pow(2).flatten(1).mean(1)
    weight_B = loss_weight(sigma_B.to(se_B.dtype), sigma_data)
    return (weight_B * se_B).mean(), se_B.mean().detach()


def build_weighted_cross_entropy(job_config, **kwargs):
    return partial(weighted_cross_entropy, sigma_data=job_config.diffusion_blocks.sigma_data)


def build_weighted_squared_error(job_config, **kwargs):
    return partial(weighted_squared_error, sigma_data=job_config.diffusion_blocks.sigma_data)
