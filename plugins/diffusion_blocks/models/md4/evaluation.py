"""The masked-diffusion LM's ELBO: one Monte Carlo draw of its integrand (the training
loss, task.py) and the held-out bits-per-character bound (the validation metric, also
tools/eval_bpc.py).

Held-out bound (`heldout_bpc`): -log p(x) <= integral over t of the ELBO integrand,
estimated by Monte Carlo over t with a fixed seed, stratified: [0, 1] is cut into
S strata of equal decrease of alpha (S a multiple of B, so a stratum lies in one
block), each held-out sequence gets one t per stratum, uniform inside it, and the
block owning that t evaluates it. bits per character = ELBO / (ln 2 * length), plus
MD4's reconstruction term eps * log2(V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...diffusion.masking import mask_tokens
from ...protocols.task import EVAL_SEED

DEFAULT_DRAWS_PER_SEQUENCE = 8  # t draws per held-out sequence (rounded up to a multiple of B)


class ElboDraw(NamedTuple):
    nats_B: torch.Tensor       # w(t) * sum of the masked CE per row: one draw of the integrand
    masked_ce_BT: torch.Tensor  # -log p(x_i | x_t) at the masked positions, 0 elsewhere
    masked_BT: torch.Tensor


def elbo_draw(model, tokens_BT, t_B, block: int, generator) -> ElboDraw:
    """Mask each row's tokens at its t, predict them with block `block`, score them."""
    schedule = model.partition.schedule
    z_BT = mask_tokens(tokens_BT, schedule.alpha(t_B), model.mask_token_id, generator)
    logits_BTV = model(z_BT, t_B, block=block)
    masked_BT = z_BT == model.mask_token_id
    ce_BT = F.cross_entropy(
        logits_BTV.flatten(0, 1).float(), tokens_BT.flatten(), reduction="none"
    ).view(tokens_BT.shape)
    masked_ce_BT = ce_BT * masked_BT
    nats_B = schedule.loss_weight(t_B.float()) * masked_ce_BT.sum(1)
    return ElboDraw(nats_B, masked_ce_BT, masked_BT)


def heldout_batches(loader, device, max_batches: int = -1) -> list[torch.Tensor]:
    """The held-out token batches (B, T); on several ranks, the same count on each
    (the fewest any rank has), so every rank runs the same forwards (FSDP)."""
    batches = []
    for input_dict, _ in loader:
        if max_batches != -1 and len(batches) >= max_batches:
            break
        batches.append(input_dict["input"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        count = torch.tensor([len(batches)], device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        batches = batches[: int(count)]
    return batches


@dataclass(frozen=True)
class BpcEstimate:
    bpc: float
    stderr: float
    sequences: int
    draws_per_sequence: int


def stratum_edges(partition, draws_per_sequence: int | None) -> list[float]:
    """Ascending t edges of S strata, S / B per block of equal alpha decrease over its
    interval (the paper's partition: S strata of equal alpha decrease), S a multiple of B."""
    blocks = partition.num_blocks
    strata = draws_per_sequence or blocks * math.ceil(DEFAULT_DRAWS_PER_SEQUENCE / blocks)
    if strata % blocks:
        raise ValueError(
            f"{strata} draws per sequence is not a multiple of the model's {blocks} blocks "
            "(each stratum of t must lie inside one block)"
        )
    return partition.schedule.block_grid(list(partition.boundaries), strata // blocks)


@torch.no_grad()
def heldout_bpc(
    model, batches: list[torch.Tensor], device, seed: int = EVAL_SEED,
    draws_per_sequence: int | None = None,
) -> BpcEstimate:
    """Bits per character bound and its standard error over `batches` (B, T) of held-out
    tokens; summed over ranks when several evaluate their shares."""
    partition, schedule = model.partition, model.partition.schedule
    edges = stratum_edges(partition, draws_per_sequence)
    strata = len(edges) - 1
    t_generator = torch.Generator().manual_seed(seed)
    mask_generator = torch.Generator(device).manual_seed(seed + 1)
    # per stratum: draws, sum and sum of squares of the per-sequence bits per character
    totals_S3 = torch.zeros(strata, 3, dtype=torch.float64, device=device)
    for tokens_BT in batches:
        tokens_BT = tokens_BT.to(device)
        for s in range(strata):  # the same order on every rank
            lo, hi = edges[s], edges[s + 1]
            t_B = hi - (hi - lo) * torch.rand(tokens_BT.shape[0], generator=t_generator, dtype=torch.float64)
            (block,) = set(partition.block_of_level(t_B).tolist())
            nats_B = elbo_draw(
                model, tokens_BT, t_B.to(device, torch.float32), block, mask_generator
            ).nats_B
            bits_B = nats_B.double() / (math.log(2) * tokens_BT.shape[1])
            totals_S3[s] += torch.stack([
                torch.tensor(float(len(bits_B)), dtype=torch.float64, device=device),
                bits_B.sum(), bits_B.pow(2).sum(),
            ])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals_S3, op=dist.ReduceOp.SUM)
    draws, sums, squares = totals_S3.cpu().unbind(1)
    if float(draws.min()) < 2:
        raise ValueError("the held-out set is too small: need at least 2 sequences")
    widths_S = torch.tensor(edges[1:], dtype=torch.float64) - torch.tensor(edges[:-1], dtype=torch.float64)
    means_S = sums / draws
    variances_S = (squares - draws * means_S**2) / (draws - 1)
    reconstruction = schedule.reconstruction_nats(model.model_args.data_vocab_size) / math.log(2)
    return BpcEstimate(
        bpc=float((widths_S * means_S).sum()) + reconstruction,
        stderr=float((widths_S**2 * variances_S / draws).sum().sqrt()),
        sequences=int(draws[0]),
        draws_per_sequence=strata,
    )


@torch.no_grad()
def elbo_integrand_profile(model, tokens_BT: torch.Tensor, times: list[float], seed: int = EVAL_SEED) -> list[float]:
    """The ELBO integrand at each t of `times` (nats per token: w(t) times the masked
    tokens' CE, averaged over the rows of `tokens_BT`), each t by the block owning it:
    where along t the model spends its bits (tools/balance_partition.py)."""
    generator = torch.Generator(tokens_BT.device).manual_seed(seed)
    profile = []
    for t in times:
        t_B = torch.full((tokens_BT.shape[0],), t, dtype=torch.float64)
        block = int(model.partition.block_of_level(t_B)[0])
        nats_B = elbo_draw(model, tokens_BT, t_B.to(tokens_BT.device, torch.float32), block, generator).nats_B
        profile.append(float(nats_B.double().mean()) / tokens_BT.shape[1])
    return profile
