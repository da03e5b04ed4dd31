"""Text generation with the recurrent-depth LM: r core iterations per new token, r
chosen at inference (`DecodingConfig.steps_per_block`: the one block's steps).

DiffusionBlocks (`RecurrentDenoiser`), per new token: the prelude runs once on the
context; the state row starts from N(0, I) * sqrt(1 + sigma_max^2); each of the r
iterations is one denoiser pass (one core pass, the coda, the head) at the next point
of the r-point equi-probability sigma grid and one step of the LM's token sampler
(`--sampler`: ancestral, or Euler with the expected clean embedding softmax(logits) @
normalize(E), docs/method.md section 6, or Heun with the same D: two passes per step, the
second at the step's end sigma, 2r in all); the last pass's logits are decoded. The
twin (`RecurrentTwin`): the prelude once, r core iterations from a random state, the
coda, the logits.
"""

from __future__ import annotations

import torch

from ... import diffusion
from ...errors import ConfigError
from ..llama3.sampler import (
    DecodingConfig, LogitsHook, pick_tokens, sigma_start, TokenStep, TOKEN_STEPS,
)
from .model import RecurrentDenoiser, RecurrentTwin


@torch.no_grad()
def denoiser_logits(
    model: RecurrentDenoiser, tokens_BT: torch.Tensor, recurrence: int,
    generator: torch.Generator, token_sampler: str = "euler",
    start_sigma: float | None = None, on_logits: LogitsHook | None = None,
    token_step: TokenStep | None = None,
) -> torch.Tensor:
    """r steps of the shared core for every position at once (state row j stands for
    the token after tokens_BT[:, j]), each step taken by the LM's token sampler
    (`TOKEN_STEPS`: Euler with the expected clean embedding, ancestral, or Heun); the
    last pass's logits (B, T, V): for Heun its second pass, at sigma_min.
    `on_logits(sigma, 0, logits_NV)` sees the logits every step starts from and, where
    it is another pass (Heun), the last one: as `llama3.sampler`'s hook, for the
    sampler's held-out CE; `token_step` replaces the sampler's step there."""
    batch, seq_len = tokens_BT.shape
    table_VD = model.clean_embedding_table()
    token_step = token_step or TOKEN_STEPS[token_sampler]
    e_BTD = model.context(tokens_BT)
    start = sigma_start(model.partition, DecodingConfig(start_sigma=start_sigma))
    z_ND = model.initial_noise_std(start) * torch.randn(
        (batch * seq_len, table_VD.shape[-1]), generator=generator
    ).to(tokens_BT.device, table_VD.dtype)
    logits_BTV, passes, reported = None, 0, 0

    def pass_logits(z_ND: torch.Tensor, sigma: float) -> torch.Tensor:
        """One denoiser pass at sigma; its logits (B * T, V), kept as the last pass's."""
        nonlocal logits_BTV, passes
        sigma_B = torch.full((batch,), sigma, device=tokens_BT.device)
        logits_BTV = model.denoise(e_BTD, z_ND.view(batch, seq_len, -1), sigma_B).logits_BTV
        passes += 1
        return logits_BTV.flatten(0, 1)

    def take_step(z_ND, logits_NV, sigma, sigma_next, next_logits):
        nonlocal reported
        if on_logits is not None:
            on_logits(sigma, 0, logits_NV)
            reported = passes
        return token_step(z_ND, logits_NV, table_VD, sigma, sigma_next, generator, next_logits)

    plan = model.partition.sampling_plan(recurrence, start)
    # one shared core: every entry of the plan is its pass, whichever block owns sigma
    diffusion.walk_plan(lambda z_ND, sigma, _block: pass_logits(z_ND, sigma), z_ND, plan, take_step)
    if on_logits is not None and reported != passes:  # Heun: its last pass, at sigma_next
        on_logits(plan[-1].sigma_next, 0, logits_BTV.flatten(0, 1))
    return logits_BTV


@torch.no_grad()
def twin_logits(
    model: RecurrentTwin, tokens_BT: torch.Tensor, recurrence: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """The prelude, r core iterations from a random state, the coda: logits (B, T, V)."""
    state_generator = torch.Generator(tokens_BT.device).manual_seed(
        int(torch.randint(0, 2**62, (), generator=generator))
    )
    return model.recur(model.context(tokens_BT), recurrence, 0, state_generator)


def sequence_logits(
    model, tokens_BT, recurrence: int, generator, token_sampler: str = "euler",
    start_sigma: float | None = None,
) -> torch.Tensor:
    """Next-token logits at every position (B, T, V) after r core iterations: what the
    sampler decodes from, given the true context (held-out CE at r). The token sampler
    and start sigma are the denoiser's (the twin has no sigma grid)."""
    if isinstance(model, RecurrentDenoiser):
        return denoiser_logits(model, tokens_BT, recurrence, generator, token_sampler, start_sigma)
    return twin_logits(model, tokens_BT, recurrence, generator)


def next_token_logits(model, context_BT, recurrence: int, generator, **options) -> torch.Tensor:
    """Logits (B, V) of the token after `context_BT`."""
    return sequence_logits(model, context_BT, recurrence, generator, **options)[:, -1]


@torch.no_grad()
def generate(
    model, prompt_BT: torch.Tensor, config: DecodingConfig, max_context: int
) -> torch.Tensor:
    """Append config.max_new_tokens tokens to each prompt row with r =
    config.steps_per_block core iterations per token; returns (B, T + new)."""
    if config.churn > 0:
        raise ConfigError(
            "decoding: churn is not supported by the recurrent-depth LM (its r core "
            "iterations are the whole sigma grid); use churn = 0"
        )
    generator = torch.Generator().manual_seed(config.seed)
    tokens_BT = prompt_BT
    for _ in range(config.max_new_tokens):
        context_BT = tokens_BT[:, -max_context:]
        logits_BV = next_token_logits(
            model, context_BT, config.steps_per_block, generator,
            token_sampler=config.sampler, start_sigma=config.start_sigma,
        )
        next_B = pick_tokens(logits_BV, config, generator)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT
