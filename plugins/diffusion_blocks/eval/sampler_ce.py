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
K. For the ancestral sampler this converges slowly (every chain ends nearly one-hot on
what it drew), so `split_draws = d` splits its first d draws on the true token: the
chains run in groups of 2^d, chain c of a group drawing the true token at draw k where
bit k of c is 0 and a token drawn from the rest where it is 1, each weighted by the
probability of its pattern (`split_draws_step`, `pattern_log_probs`): unbiased for
p(true), and the pattern where every draw is the true one needs no luck to be seen.

The decision profile (`SamplerCE.profile`): the same estimator at every state the chain
reaches, read by the block owning its sigma (the logits each step starts from, then the
final ones). Point j is exactly the CE of the sampler stopped there (`DecodingConfig.
stop_sigma` = its sigma: the same draws up to it), and at high sigma the softmax is
smooth, so there the estimate converges with few chains; the last point is `ce`. Where
it rises from one block's last point to the next, the later block loses what the
earlier one knew (`block_losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.llama3.sampler import (
    DecodingConfig, LogitsHook, TokenStep, ancestral_token_step, decoding_plan,
    denoise_next_token_logits, is_denoiser, renoised_tokens, sample_from, sigma_start,
)
from ..models.recurrent import sampler as recurrent_sampler
from ..models.recurrent.model import RecurrentDenoiser
from .text import next_token_ce

# p(true) below this is reported as `floor_fraction` (not clamped: the CE keeps it)
FLOOR = 1e-6


@dataclass(frozen=True)
class ProfilePoint:
    """The sampler stopped at one state of its chain: its CE as for SamplerCE."""

    sigma: float
    block: int
    ce: float
    ce_by_chains: dict[int, float]
    floor_fraction: float


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
    stop_sigma: float | None = None
    profile: tuple[ProfilePoint, ...] = ()  # every state of the chain, the last = ce
    split_draws: int = 0            # draws split on the true token (0: plain chains)

    def best_point(self) -> ProfilePoint:
        """The stop with the lowest CE at all chains."""
        return min(self.profile, key=lambda point: point.ce)


def block_ends(profile) -> dict[int, ProfilePoint]:
    """Each block's last reading in the chain (the final read's owner: that one)."""
    ends: dict[int, ProfilePoint] = {}
    for point in profile:
        ends[point.block] = point
    return ends


def block_losses(profile) -> dict[int, float]:
    """CE at each block's last reading minus CE at the previous block's (in chain
    order; the first block maps to 0): positive = the block lost what came before."""
    ends = list(block_ends(profile).items())
    return {block: (point.ce - ends[i - 1][1].ce if i else 0.0)
            for i, (block, point) in enumerate(ends)}


def all_positions_denoiser(model, context_BT: torch.Tensor):
    """logits(z_ND, sigma, block, self_cond_ND=None) -> (N, V) with N = B * T: block
    `block`'s logits for the token after every prefix context_BT[b, :t + 1], row
    b * T + t of z (and of the self-conditioning estimates) holding that token's noisy
    row. One `model.denoise` call: a noisy row sees its clean prefix and itself only,
    so the T rows of a window are T independent chains."""
    batch, seq_len = context_BT.shape

    def logits(z_ND: torch.Tensor, sigma: float, block: int, self_cond_ND=None) -> torch.Tensor:
        def per_window(x_ND):
            return None if x_ND is None else x_ND.reshape(batch, seq_len, x_ND.shape[-1])

        sigma_B = torch.full((batch,), sigma, device=z_ND.device)
        logits_BTV = model.denoise(
            context_BT, per_window(z_ND), sigma_B, block, per_window(self_cond_ND)
        ).logits_BTV
        return logits_BTV.reshape(batch * seq_len, -1)

    return logits


@torch.no_grad()
def all_positions_next_token_logits(
    model, context_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    table_VD: torch.Tensor | None = None, on_logits: LogitsHook | None = None,
    token_step: TokenStep | None = None,
) -> torch.Tensor:
    """One chain of the configured sampler for the token after every prefix of
    context_BT: the final logits (B, T, V), position t's after context_BT[:, :t + 1];
    `on_logits` and `token_step` as for denoise_next_token_logits, logits (B * T, V)."""
    batch, seq_len = context_BT.shape
    logits_NV = denoise_next_token_logits(
        model, context_BT, config, generator, last_row=all_positions_denoiser,
        table_VD=table_VD, rows=batch * seq_len, on_logits=on_logits, token_step=token_step,
    )
    return logits_NV.reshape(batch, seq_len, -1)


def chain_logits(
    model, context_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    table_VD: torch.Tensor | None = None, on_logits: LogitsHook | None = None,
    token_step: TokenStep | None = None,
) -> torch.Tensor:
    """Every position's chain, final logits (B, T, V): the block-partitioned LM's
    (`all_positions_next_token_logits`), or the recurrent-depth LM's r passes of its
    one core (`models.recurrent.sampler.denoiser_logits`, r = config.steps_per_block;
    its token is drawn from the last pass's logits)."""
    if isinstance(model, RecurrentDenoiser):
        return recurrent_sampler.denoiser_logits(
            model, context_BT, config.steps_per_block, generator, config.sampler,
            config.start_sigma, on_logits=on_logits, token_step=token_step,
        )
    return all_positions_next_token_logits(
        model, context_BT, config, generator, table_VD, on_logits=on_logits, token_step=token_step)


def chain_steps(model, config: DecodingConfig) -> int:
    """The steps (so the ancestral draws) of one chain."""
    if isinstance(model, RecurrentDenoiser):
        return len(model.partition.sampling_plan(config.steps_per_block, sigma_start(model.partition, config)))
    return len(decoding_plan(model.partition, config))


def context_and_labels(windows_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position's clean context and its true next token: (B, T-1) each."""
    return windows_BT[:, :-1], windows_BT[:, 1:]


def split_draws_step(labels_N: torch.Tensor, rows_per_copy: int, split_draws: int) -> TokenStep:
    """The ancestral step with its first `split_draws` draws split on the true token:
    at draw k, the rows of copy c (rows c * rows_per_copy ...) take the true token where
    bit k of c mod 2^split_draws is 0 and a token drawn from the logits without it where
    it is 1 (`pattern_log_probs` weighs them); later draws as the ancestral sampler."""
    draw = [0]

    def step(z_ND, logits_NV, table_VD, sigma, sigma_next, generator, next_logits=None):
        k = draw[0]
        draw[0] += 1
        if k >= split_draws:
            return ancestral_token_step(z_ND, logits_NV, table_VD, sigma, sigma_next, generator)
        true_N = labels_N.to(logits_NV.device)
        copy_N = torch.arange(z_ND.shape[0], device=logits_NV.device) // rows_per_copy
        takes_true_N = ((copy_N % 2 ** split_draws) >> k) % 2 == 0
        without_true_NV = logits_NV.float().scatter(-1, true_N[:, None], -math.inf)
        tokens_N = torch.where(takes_true_N, true_N, sample_from(without_true_NV, generator))
        return renoised_tokens(tokens_N, table_VD, sigma_next, generator, z_ND)

    return step


def pattern_log_probs(log_probs_CPBT: torch.Tensor, split_draws: int) -> torch.Tensor:
    """Split-draw chains (C = groups x 2^d, d = split_draws, the pattern of copy c its
    bits) -> one estimate of log p(true) per group and state, (groups, P, B, T). Draw k
    is taken from state k's softmax, so its probability of the true token is p_k =
    exp(log_probs[:, k]); a copy's weight before state j is the product over its draws
    k < min(j, d) of p_k (bit 0) or 1 - p_k (bit 1), and
        p_hat_j = sum over copies of weight_j x softmax_j(true) / 2^(d - min(j, d)),
    the copies that share a pattern's first min(j, d) bits averaged: E[p_hat_j] is the
    probability that the sampler stopped at state j draws the true token."""
    copies, points = log_probs_CPBT.shape[:2]
    patterns = 2 ** split_draws
    log_probs_GQPBT = log_probs_CPBT.reshape(copies // patterns, patterns, *log_probs_CPBT.shape[1:])
    bits_Qd = (torch.arange(patterns)[:, None] >> torch.arange(split_draws)) % 2
    estimates = []
    for j in range(points):
        log_weight_GQBT = torch.zeros_like(log_probs_GQPBT[:, :, 0])
        for k in range(min(j, split_draws)):
            log_p_GQBT = log_probs_GQPBT[:, :, k]
            log_not_p_GQBT = torch.log1p(-log_p_GQBT.exp().clamp(max=1.0))
            took_other_Q = bits_Qd[:, k].bool()[None, :, None, None]
            log_weight_GQBT = log_weight_GQBT + torch.where(took_other_Q, log_not_p_GQBT, log_p_GQBT)
        unsplit = split_draws - min(j, split_draws)
        estimates.append(torch.logsumexp(log_weight_GQBT + log_probs_GQPBT[:, :, j], dim=1)
                         - unsplit * math.log(2))
    return torch.stack(estimates, dim=1)


@torch.no_grad()
def chain_log_probs(
    model, windows_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    copies: int = 1, table_VD: torch.Tensor | None = None, split_draws: int = 0,
) -> tuple[list[tuple[float, int]], torch.Tensor]:
    """log softmax(logits)[true next token] of `copies` independent chains at every
    state each chain reaches, (copies, P, B, T - 1) float64, with the P states'
    (sigma, block); the last state's logits are the final ones. The copies run as one
    batch (the windows repeated). `split_draws` d > 0: the split-draws estimator
    (`split_draws_step`; copies a multiple of 2^d), one estimate per group of 2^d
    copies: (copies / 2^d, P, B, T - 1)."""
    context_BT, labels_BT = context_and_labels(windows_BT)
    batch = context_BT.shape[0]
    labels_N1 = labels_BT.repeat(copies, 1).reshape(-1, 1)
    points, readings = [], []

    def record(sigma: float, block: int, logits_NV: torch.Tensor) -> None:
        log_probs_NV = torch.log_softmax(logits_NV.double(), dim=-1)
        readings.append(log_probs_NV.gather(-1, labels_N1).reshape(copies, batch, -1).cpu())
        points.append((sigma, block))

    token_step = (split_draws_step(labels_N1[:, 0], labels_N1.shape[0] // copies, split_draws)
                  if split_draws else None)
    chain_logits(model, context_BT.repeat(copies, 1), config, generator, table_VD,
                 on_logits=record, token_step=token_step)
    log_probs_CPBT = torch.stack(readings, dim=1)
    return points, pattern_log_probs(log_probs_CPBT, split_draws) if split_draws else log_probs_CPBT


def mixture_log_probs(log_probs_KN: torch.Tensor, chains: int) -> torch.Tensor:
    """log of the first `chains` chains' mean probability per position, (N,)."""
    return torch.logsumexp(log_probs_KN[:chains], dim=0) - math.log(chains)


def chain_counts(chains: int) -> list[int]:
    """K/4, K/2 and K (each at least 1, repeats dropped)."""
    return sorted({max(1, chains // 4), max(1, chains // 2), chains})


def check_inputs(
    model, windows_BT: torch.Tensor, chains: int, chains_per_call: int,
    config: DecodingConfig, split_draws: int,
) -> None:
    if split_draws < 0:
        raise ValueError(f"split_draws must be >= 0, got {split_draws}")
    if split_draws and config.sampler != "ancestral":
        raise ValueError(
            f"split_draws splits the ancestral sampler's draws; sampler {config.sampler!r} "
            "draws none: use split_draws = 0"
        )
    if chains % 2 ** split_draws:
        raise ValueError(
            f"split_draws = {split_draws} runs the chains in groups of {2 ** split_draws}: "
            f"chains must be a multiple of it, got {chains}"
        )
    if not is_denoiser(model):
        raise ValueError("the sampler's CE needs a block-partitioned denoiser (a model with a partition)")
    if isinstance(model, RecurrentDenoiser) and (config.stop_sigma is not None or config.churn):
        raise ValueError("the recurrent-depth LM's chain takes neither stop_sigma nor churn")
    if windows_BT.dim() != 2 or windows_BT.shape[0] < 1 or windows_BT.shape[1] < 2:
        raise ValueError(
            f"windows must be (B, T) with B >= 1 and T >= 2 (a context and its next "
            f"token), got shape {tuple(windows_BT.shape)}"
        )
    if chains < 1:
        raise ValueError(f"chains must be >= 1, got {chains}")
    if chains_per_call < 1:
        raise ValueError(f"chains_per_call must be >= 1, got {chains_per_call}")


def profile_point(sigma: float, block: int, log_probs_KN: torch.Tensor, runs: int = 1) -> ProfilePoint:
    """The estimator over K estimates of log p(true) per position, (K, N), each from
    `runs` chains (ce_by_chains keyed by chains run)."""
    chains = log_probs_KN.shape[0]
    ce_by_chains = {runs * k: float(-mixture_log_probs(log_probs_KN, k).mean())
                    for k in chain_counts(chains)}
    log_p_N = mixture_log_probs(log_probs_KN, chains)
    return ProfilePoint(
        sigma=sigma, block=block, ce=ce_by_chains[runs * chains], ce_by_chains=ce_by_chains,
        floor_fraction=float((log_p_N < math.log(FLOOR)).double().mean()),
    )


def summary(
    points: list[tuple[float, int]], log_probs_KPN: torch.Tensor, config: DecodingConfig,
    twin_ce: float | None, split_draws: int = 0,
) -> SamplerCE:
    """SamplerCE of K estimates of log p(true) per state and position, (K, P, N): one
    per chain, or per group of 2^split_draws chains (`chains` and the keys of
    `ce_by_chains` count chains run either way)."""
    estimates, _, positions = log_probs_KPN.shape
    runs = 2 ** split_draws
    profile = tuple(profile_point(sigma, block, log_probs_KPN[:, j], runs)
                    for j, (sigma, block) in enumerate(points))
    final = profile[-1]
    log_p_N = mixture_log_probs(log_probs_KPN[:, -1], estimates)
    stderr = float((-log_p_N).std() / math.sqrt(positions)) if positions > 1 else math.nan
    return SamplerCE(
        ce=final.ce, ce_by_chains=final.ce_by_chains, stderr=stderr,
        floor_fraction=final.floor_fraction, positions=positions, chains=runs * estimates,
        sampler=config.sampler, steps_per_block=config.steps_per_block, churn=config.churn,
        twin_ce=twin_ce, stop_sigma=config.stop_sigma, profile=profile, split_draws=split_draws,
    )


def chains_log_probs(
    model, windows_BT: torch.Tensor, config: DecodingConfig, chains: int, seed: int,
    chains_per_call: int, on_chains: Callable[[int], None] | None = None,
    split_draws: int = 0,
) -> tuple[list[tuple[float, int]], torch.Tensor, int]:
    """log p(label) of every chain (of every group of 2^d for split_draws d, capped at
    the chain's draws) at every state it reaches and every position: (chains / 2^d, P,
    B, T - 1), the states' (sigma, block) and d; the chains run `chains_per_call` at a
    time (rounded up to whole groups) from one generator seeded `seed`."""
    check_inputs(model, windows_BT, chains, chains_per_call, config, split_draws)
    split_draws = min(split_draws, chain_steps(model, config))
    group = 2 ** split_draws
    per_call = -(-chains_per_call // group) * group
    windows_BT = windows_BT.to(model.tok_embeddings.weight.device)
    generator = torch.Generator().manual_seed(seed)
    table_VD = model.clean_embedding_table()
    groups, done = [], 0
    while done < chains:
        copies = min(per_call, chains - done)
        points, log_probs = chain_log_probs(
            model, windows_BT, config, generator, copies, table_VD, split_draws=split_draws)
        groups.append(log_probs)
        done += copies
        if on_chains is not None:
            on_chains(done)
    return points, torch.cat(groups), split_draws


@torch.no_grad()
def sampler_heldout_ce(
    model, windows_BT: torch.Tensor, config: DecodingConfig, chains: int, seed: int = 0,
    twin=None, chains_per_call: int = 1, on_chains: Callable[[int], None] | None = None,
    split_draws: int = 0,
) -> SamplerCE:
    """The sampler's held-out CE (nats/token) over every position of `windows_BT`
    (B, T) of real tokens, from `chains` independent chains of config's sampler
    (sampler, steps_per_block, churn, start_sigma; the final distribution is read at
    temperature 1 without top-k, and the chain runs uncached whatever config.kv_cache).
    `twin`: an end-to-end model whose next-token CE on the same positions comes along.
    `chains_per_call` chains run as one batch (memory); `on_chains(done)` is called
    after each batch. The chains draw from one generator seeded `seed`, so the result
    depends on chains_per_call as well as seed. `split_draws` d: the ancestral sampler's
    first d draws split on the true token (see the module's docstring; converges in far
    fewer chains; chains a multiple of 2^d, d capped at the chain's draws)."""
    points, log_probs_KPBT, split_draws = chains_log_probs(
        model, windows_BT, config, chains, seed, chains_per_call, on_chains, split_draws
    )
    twin_ce = None if twin is None else next_token_ce(twin, *context_and_labels(windows_BT))
    return summary(points, log_probs_KPBT.flatten(2), config, twin_ce, split_draws)


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
    _, log_probs_KSBL, _ = chains_log_probs(model, windows_BT, config, chains, seed, chains_per_call)
    # the final state's; label j of a window is token j + 1: the continuation's tokens
    # are labels P - 1 ...
    log_probs_KN = log_probs_KSBL[:, -1, :, prompts_BP.shape[1] - 1:].flatten(1)
    return float(-mixture_log_probs(log_probs_KN, chains).mean())
