"""Text generation with the block-partitioned denoiser and with its end-to-end twin.

Denoiser, per new token (DESIGN.md section 6): start the noisy row of the next token
from N(0, I) * sqrt(1 + sigma_max^2), take Euler steps over the equi-probability sigma
grid (one step per block by default), each step running only the block that owns its
sigma, then decode the final logits (greedy by default; temperature / top-k optional).
"""

import math
from dataclasses import dataclass

import torch

from ... import diffusion


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    steps_per_block: int = 1
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = whole vocabulary
    seed: int = 0


def pick_tokens(logits_BV: torch.Tensor, config: DecodingConfig, generator) -> torch.Tensor:
    if config.temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits_BV, config.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)


@torch.no_grad()
def denoise_next_token_logits(
    model, context_BT: torch.Tensor, steps_per_block: int, generator: torch.Generator
) -> torch.Tensor:
    """Run the Euler sampler for the token after `context_BT`; returns its logits (B, V)."""
    partition = model.partition
    batch, seq_len = context_BT.shape
    dim = model.tok_embeddings.weight.shape[-1]
    scale = diffusion.initial_noise_scale(partition.schedule.sigma_max, data_is_unit_norm=True)
    z_BTD = scale * torch.randn(
        (batch, seq_len, dim), generator=generator
    ).to(context_BT.device, model.tok_embeddings.weight.dtype)
    logits_BTV = None
    for step in partition.sampling_plan(partition.num_blocks * steps_per_block):
        sigma_B = torch.full((batch,), step.sigma, device=context_BT.device)
        denoised_BTD, logits_BTV = model.denoise(context_BT, z_BTD, sigma_B, step.block)
        z_BTD = diffusion.euler_step(z_BTD, denoised_BTD, step.sigma, step.sigma_next)
    # noisy row T-1 denoises the token after the last context token
    return logits_BTV[:, -1]


@torch.no_grad()
def autoregressive_next_token_logits(model, context_BT, steps_per_block, generator):
    """The end-to-end twin: a plain next-token forward."""
    return model(context_BT)[:, -1]


@torch.no_grad()
def generate(
    model, prompt_BT: torch.Tensor, config: DecodingConfig, max_context: int
) -> torch.Tensor:
    """Append config.max_new_tokens tokens to each prompt row; returns (B, T + new)."""
    next_token_logits = (
        denoise_next_token_logits if hasattr(model, "partition")
        else autoregressive_next_token_logits
    )
    generator = torch.Generator().manual_seed(config.seed)
    tokens_BT = prompt_BT
    for _ in range(config.max_new_tokens):
        context_BT = tokens_BT[:, -max_context:]
        logits_BV = next_token_logits(model, context_BT, config.steps_per_block, generator)
        next_B = pick_tokens(logits_BV, config, generator)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
    return tokens_BT
