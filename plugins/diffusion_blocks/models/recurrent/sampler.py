"""Text generation with the recurrent-depth LM: r core iterations per new token, r
chosen at inference (`DecodingConfig.steps_per_block`: the one block's steps).

DiffusionBlocks (`RecurrentDenoiser`), per new token: the prelude runs once on the
context; the state row starts from N(0, I) * sqrt(1 + sigma_max^2); each of the r
iterations is one denoiser pass (one core pass, the coda, the head) at the next point
of the r-point equi-probability sigma grid and one Euler step whose D is the model's
expected clean embedding softmax(logits) @ normalize(E) (DESIGN.md section 6); the
last pass's logits are decoded. The twin (`RecurrentTwin`): the prelude once, r core
iterations from a random state, the coda, the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import diffusion
from ..llama3.sampler import DecodingConfig, pick_tokens
from .model import RecurrentDenoiser, RecurrentTwin


def expected_clean_embedding(logits_BTV: torch.Tensor, embedding_VD: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ normalize(E): the denoised estimate an Euler step uses for a
    discrete target (the normalised token table, as the training targets are)."""
    probs_BTV = torch.softmax(logits_BTV.float(), dim=-1)
    return (probs_BTV @ F.normalize(embedding_VD.float(), dim=-1)).to(embedding_VD.dtype)


@torch.no_grad()
def denoiser_next_token_logits(
    model: RecurrentDenoiser, context_BT: torch.Tensor, recurrence: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """r Euler steps of the shared core for the token after `context_BT`; logits (B, V)."""
    batch, seq_len = context_BT.shape
    embedding_VD = model.tok_embeddings.weight
    e_BTD = model.context(context_BT)
    scale = diffusion.initial_noise_scale(model.schedule.sigma_max, data_is_unit_norm=True)
    z_BTD = scale * torch.randn(
        (batch, seq_len, embedding_VD.shape[-1]), generator=generator
    ).to(context_BT.device, embedding_VD.dtype)
    logits_BTV = None
    for step in model.partition.sampling_plan(recurrence):
        sigma_B = torch.full((batch,), step.sigma, device=context_BT.device)
        logits_BTV = model.denoise(e_BTD, z_BTD, sigma_B).logits_BTV
        denoised_BTD = expected_clean_embedding(logits_BTV, embedding_VD)
        z_BTD = diffusion.euler_step(z_BTD, denoised_BTD, step.sigma, step.sigma_next)
    # state row T-1 stands for the token after the last context token
    return logits_BTV[:, -1]


@torch.no_grad()
def twin_next_token_logits(
    model: RecurrentTwin, context_BT: torch.Tensor, recurrence: int,
    generator: torch.Generator,
) -> torch.Tensor:
    batch, seq_len = context_BT.shape
    state_generator = torch.Generator(context_BT.device).manual_seed(
        int(torch.randint(0, 2**62, (), generator=generator))
    )
    logits_BTV = model.recur(model.context(context_BT), recurrence, 0, state_generator)
    return logits_BTV[:, -1]


def next_token_logits(model, context_BT, recurrence: int, generator) -> torch.Tensor:
    if isinstance(model, RecurrentDenoiser):
        return denoiser_next_token_logits(model, context_BT, recurrence, generator)
    return twin_next_token_logits(model, context_BT, recurrence, generator)


@torch.no_grad()
def generate(
    model, prompt_BT: torch.Tensor, config: DecodingConfig, max_context: int
) -> torch.Tensor:
    """Append config.max_new_tokens tokens to each prompt row with r =
    config.steps_per_block core iterations per token; returns (B, T + new)."""
    generator = torch.Generator().manual_seed(config.seed)
    tokens_BT = prompt_BT
    for _ in range(config.max_new_tokens):
        context_BT = tokens_BT[:, -max_context:]
        logits_BV = next_token_logits(model, context_BT, config.steps_per_block, generator)
        next_B = pick_tokens(logits_BV, config, generator)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT
