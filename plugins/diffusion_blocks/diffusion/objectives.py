"""Training losses as SUMS over the items of a microbatch (tokens for the LM, images for
vision), with the item count: the trainer divides by the global item count, as
torchtitan does (so gradient accumulation and data parallelism need no other scaling).

w(sigma)-weighted cross-entropy for discrete targets (tokens, classes) and
w(sigma)-weighted squared error for continuous ones (images), each with the
unweighted sum beside it for logging."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from .edm import broadcast_sigma, loss_weight


class LossSums(NamedTuple):
    loss_sum: torch.Tensor        # what backward() sees (after division by the item count)
    unweighted_sum: torch.Tensor  # plain CE / squared error, detached, for logging
    num_items: torch.Tensor       # valid items (int64)


def _token_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor):
    """(CE per position, validity mask), both (B, T)."""
    ce_BT = F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), labels_BT.flatten(0, 1),
        reduction="none", ignore_index=IGNORE_INDEX,
    ).view(labels_BT.shape)
    return ce_BT, (labels_BT != IGNORE_INDEX)


def per_sample_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean CE over each sample's valid positions, shape (B,)."""
    ce_BT, valid_BT = _token_cross_entropy(logits_BTV, labels_BT)
    valid_BT = valid_BT.float()
    return (ce_BT * valid_BT).sum(1) / valid_BT.sum(1).clamp_min(1.0)


def label_ce_sums(
    ce: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor | None = None
) -> LossSums:
    """LossSums of per-label CE (any shape, 0 where the label is IGNORE_INDEX): the sum
    of row_weight * CE (of CE without weights), the plain CE sum, the valid count."""
    ce_sum = ce.sum()
    loss_sum = ce_sum if row_weight is None else (row_weight * ce).sum()
    return LossSums(loss_sum, ce_sum.detach(), (labels != IGNORE_INDEX).sum())


def sigma_loss_weights(sigma: torch.Tensor, sigma_data: float, ce_BT: torch.Tensor) -> torch.Tensor:
    """w(sigma) per CE entry: sigma is one per sequence (B,) or one per token (B, T)."""
    return broadcast_sigma(loss_weight(sigma.to(ce_BT.dtype), sigma_data), ce_BT)


def cross_entropy_sums(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> LossSums:
    ce_BT, _ = _token_cross_entropy(logits_BTV, labels_BT)
    return label_ce_sums(ce_BT, labels_BT)


def weighted_cross_entropy_sums(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, sigma: torch.Tensor,
    sigma_data: float,
) -> LossSums:
    """sum over valid positions of w(sigma_bt) * CE_bt, and of CE_bt; sigma is one per
    sequence (B,) or one per token (B, T)."""
    ce_BT, _ = _token_cross_entropy(logits_BTV, labels_BT)
    return label_ce_sums(ce_BT, labels_BT, sigma_loss_weights(sigma, sigma_data, ce_BT))


def weighted_squared_error_sums(
    denoised: torch.Tensor, target: torch.Tensor, sigma_B: torch.Tensor,
    sigma_data: float,
) -> LossSums:
    """sum over images of w(sigma) * ||D - y||^2 / dims, and of the plain mean squared error."""
    se_B = (denoised.float() - target.float()).pow(2).flatten(1).mean(1)
    weight_B = loss_weight(sigma_B.to(se_B.dtype), sigma_data)
    count = torch.tensor(se_B.shape[0], dtype=torch.int64, device=se_B.device)
    return LossSums((weight_B * se_B).sum(), se_B.sum().detach(), count)


def build_squared_error_loss(job_config, **kwargs):
    """The DiT spec's `build_loss_fn`: mean squared error summed over images."""

    def squared_error_sum(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1).sum()

    return squared_error_sum
