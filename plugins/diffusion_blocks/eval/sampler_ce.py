"""The sampler's held-out cross-entropy (issue 21): how well the denoiser's whole
sampling chain, not one block, predicts real text.

For held-out windows (B, T) of real tokens, the clean prefix of every position is the
real text, and the noisy row of every position's next token runs the sampler's chain
(`sampler.denoise_next_token_logits`, the loop `generate` runs: each step by the block
owning its sigma), all positions of a window at once through `all_positions_denoiser`.
The distribution the final pick is drawn from (the logits of the block owning sigma_min,
read at sigma_min after the last step, temperature 1, no top-k) averaged over K
independent chains estimates p(next token | context):

    CE = mean over positions of -log( (1/K) sum_k softmax(final_logits_k)[true token] )

Rao-Blackwellised at the last step: the softmax is averaged, never the one-hot draw. The
estimate is biased upwards for finite K (Jensen: E[-log p_hat] >= -log E[p_hat]), so
`SamplerCE.ce_by_chains` gives it at K/4, K/2 and K chains: how much it still moves with
K. A deterministic chain (euler or heun, churn 0) still draws its start noise, so it is
deterministic only given that noise; the formula is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.llama3.sampler import DecodingConfig, denoise_next_token_logits, is_denoiser
from .text import next_token_ce

# p(true) below this is reported as `floor_fraction` (not clamped: the CE keeps it)
FLOOR = 1e-6


@dataclass(frozen=True)
class SamplerCE:
    """The sampler's held-out CE (nats/token) and how far to trust it."""

    ce: float                       # at all `chains` chains
    ce_by_chains: dict[int, float]  # chains used -> CE: K/4, K/2, K (at least 1 each)
    stderr: float                   # std of the per-position CE / sqrt(positions); positions
                                    # of one window are correlated, so this is a lower bound
    floor_fraction: float           # positions whose estimated p(true) < FLOOR
    positions: int                  # B * (T - 1)
    chains: int
    sampler: str
    steps_per_block: int
    churn: float
    twin_ce: float | None = None    # the end-to-end twin's next-token CE, same positions


def all_positions_denoiser(model, context_BT: torch.Tensor):
    """logits(z_ND, sigma, block) -> (N, V) with N = B * T: block `block`'s logits for
    the token after every prefix context_BT[b, :t + 1], row b * T + t of z holding that
    token's noisy row. One `model.denoise` call: a noisy row sees its clean prefix and
    itself only, so the T rows of a window are T independent chains."""
    batch, seq_len = context_BT.shape

    def logits(z_ND: torch.Tensor, sigma: float, block: int) -> torch.Tensor:
        z_BTD = z_ND.reshape(batch, seq_len, z_ND.shape[-1])
        sigma_B = torch.full((batch,), sigma, device=z_ND.device)
        logits_BTV = model.denoise(context_BT, z_BTD, sigma_B, block).logits_BTV
        return logits_BTV.reshape(batch * seq_len, -1)

    return logits


@torch.no_grad()
def all_positions_next_token_logits(
    model, context_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    table_VD: torch.Tensor | None = None,
) -> torch.Tensor:
    """One chain of the configured sampler for the token after every prefix of
    context_BT: the final logits (B, T, V), position t's after context_BT[:, :t + 1]."""
    batch, seq_len = context_BT.shape
    logits_NV = denoise_next_token_logits(
        model, context_BT, config, generator, last_row=all_positions_denoiser,
        table_VD=table_VD, rows=batch * seq_len,
    )
    return logits_NV.reshape(batch, seq_len, -1)


def context_and_labels(windows_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's clean context and its true next token: (B, T-1) each."""
    return windows_BT[:, :-1], windows_BT[:, 1:]


@torch.no_grad()
def chain_log_probs(
    model, windows_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    copies: int = 1, table_VD: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(final logits)[true next token] of `copies` independent chains,
    (copies, B, T - 1), float64; the copies run as one batch (the windows repeated)."""
    context_BT, labels_BT = context_and_labels(windows_BT)
    batch = context_BT.shape[0]
    logits_CTV = all_positions_next_token_logits(
        model, context_BT.repeat(copies, 1), config, generator, table_VD
    )
    log_probs_CTV = torch.log_softmax(logits_CTV.double(), dim=-1)
    labels_CT = labels_BT.repeat(copies, 1)
    true_CT = log_probs_CTV.gather(-1, labels_CT[..., None]).squeeze(-1)
    return true_CT.reshape(copies, batch, -1).cpu()


def mixture_log_probs(log_probs_KN: torch.Tensor, chains: int) -> torch.Tensor:
    """log of the first `chains` chains' mean probability per position, (N,)."""
    return torch.logsumexp(log_probs_KN[:chains], dim=0) - math.log(chains)


def chain_counts(chains: int) -> list[int]:
    """K/4, K/2 and K (each at least 1, repeats dropped)."""
    return sorted({max(1, chains // 4), max(1, chains // 2), chains})


def check_inputs(model, windows_BT: torch.Tensor, chains: int, chains_per_call: int) -> None:
    if not is_denoiser(model):
        raise ValueError("the sampler's CE needs a block-partitioned denoiser (a model with a partition)")
    if windows_BT.dim() != 2 or windows_BT.shape[0] < 1 or windows_BT.shape[1] < 2:
        raise ValueError(
            f"windows must be (B, T) with B >= 1 and T >= 2 (a context and its next "
            f"token), got shape {tuple(windows_BT.shape)}"
        )
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    if chains_per_call < 1:
        raise ValueError(f"chains_per_call must be >= 1, got {chains_per_call}")


def summary(log_probs_KN: torch.Tensor, config: DecodingConfig, twin_ce: float | None) -> SamplerCE:
    """SamplerCE of every chain's log p(true) per position, (K, N)."""
    chains, positions = log_probs_KN.shape
    ce_by_chains = {k: float(-mixture_log_probs(log_probs_KN, k).mean()) for k in chain_counts(chains)}
    log_p_N = mixture_log_probs(log_probs_KN, chains)
    stderr = float((-log_p_N).std() / math.sqrt(positions)) if positions > 1 else math.nan
    return SamplerCE(
        ce=ce_by_chains[chains], ce_by_chains=ce_by_chains, stderr=stderr,
        floor_fraction=float((log_p_N < math.log(FLOOR)).double().mean()),
        positions=positions, chains=chains, sampler=config.sampler,
        steps_per_block=config.steps_per_block, churn=config.churn, twin_ce=twin_ce,
    )


def chains_log_probs(
    model, windows_BT: torch.Tensor, config: DecodingConfig, chains: int, seed: int,
    chains_per_call: int, on_chains: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """log p(label) of every chain at every position: (chains, B, T - 1), the chains
    run `chains_per_call` at a time from one generator seeded `seed`."""
    check_inputs(model, windows_BT, chains, chains_per_call)
    windows_BT = windows_BT.to(model.tok_embeddings.weight.device)
    generator = torch.Generator().manual_seed(seed)
    table_VD = model.clean_embedding_table()
    groups, done = [], 0
    while done < chains:
        copies = min(chains_per_call, chains - done)
        groups.append(chain_log_probs(model, windows_BT, config, generator, copies, table_VD))
        done += copies
        if on_chains is not None:
            on_chains(done)
    return torch.cat(groups)


@torch.no_grad()
def sampler_heldout_ce(
    model, windows_BT: torch.Tensor, config: DecodingConfig, chains: int, seed: int = 0,
    twin=None, chains_per_call: int = 1, on_chains: Callable[[int], None] | None = None,
) -> SamplerCE:
    """The sampler's held-out CE (nats/token) over every position of `windows_BT`
    (B, T) of real tokens, from `chains` independent chains of config's sampler
    (sampler, steps_per_block, churn, start_sigma; the final distribution is read at
    temperature 1 without top-k, and the chain runs uncached whatever config.kv_cache).
    `twin`: an end-to-end model whose next-token CE on the same positions comes along.
    `chains_per_call` chains run as one batch (memory); `on_chains(done)` is called
    after each batch. The chains draw from one generator seeded `seed`, so the result
    depends on chains_per_call as well as seed."""
    log_probs_KN = chains_log_probs(
        model, windows_BT, config, chains, seed, chains_per_call, on_chains
    ).flatten(1)
    twin_ce = None if twin is None else next_token_ce(twin, *context_and_labels(windows_BT))
    return summary(log_probs_KN, config, twin_ce)


@torch.no_grad()
def sampler_judge_ce(
    model, prompts_BP: torch.Tensor, continuations_BC: torch.Tensor, config: DecodingConfig,
    chains: int, seed: int = 0, chains_per_call: int = 1,
) -> float:
    """A denoiser as a JUDGE of samples: the mean CE (nats/token) of the continuations
    given their prompts under `chains` chains of config's sampler (the estimator of
    `sampler_heldout_ce`, read at the continuation's positions only): the shape of
    `text.judge_ce` with a DiffusionBlocks model's sampling distribution as the judge."""
    windows_BT = torch.cat([prompts_BP, continuations_BC], dim=1)
    log_probs_KBL = chains_log_probs(model, windows_BT, config, chains, seed, chains_per_call)
    # label j of a window is token j + 1: the continuation's tokens are labels P - 1 ...
    log_probs_KN = log_probs_KBL[:, :, prompts_BP.shape[1] - 1:].flatten(1)
    return float(-mixture_log_probs(log_probs_KN, chains).mean())
