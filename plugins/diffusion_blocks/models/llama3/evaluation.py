"""Probes of the autoregressive denoiser's blocks (tools/reports/lm.py and the tests;
the measures of any LM and its samples are in eval/text.py).

- `teacher_forced_denoising_ce`: the block owning sigma predicts the true next tokens of
  held-out windows from the clean prefix and an uninformative noisy row (the state the
  sampler starts from at that sigma), beside eval/text.py's `next_token_ce`, an
  end-to-end model's held-out next-token CE;
- `denoising_ce_profile`: the owning block's CE of the true token from a noisy row at
  each sigma (the training corruption), the profile the information-balanced partition
  cuts;
- `single_block_continuations`: text that block writes on its own (each token drawn
  from its logits on an uninformative noisy row, no denoising chain), to tell the
  block's quality from the sampling chain's.
"""

from __future__ import annotations

import torch

from ...diffusion.objectives import per_sample_cross_entropy
from .sampler import DecodingConfig, generate, last_row_denoiser, owner_of, uninformative_state


@torch.no_grad()
def teacher_forced_denoising_ce(
    model, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, sigma: float,
    generator: torch.Generator,
) -> float:
    """Mean CE (nats/token) of the logits of the block owning `sigma` for the true
    next tokens, every noisy row an uninformative state at sigma (it carries nothing of
    its label): how well that block predicts a token from its context alone."""
    dim = model.tok_embeddings.weight.shape[-1]
    like = model.tok_embeddings.weight
    z_BTD = uninformative_state((*tokens_BT.shape, dim), sigma, generator, like)
    sigma_B = torch.full((tokens_BT.shape[0],), sigma, device=like.device)
    logits_BTV = model.denoise(tokens_BT, z_BTD, sigma_B, owner_of(model.partition, sigma)).logits_BTV
    return float(per_sample_cross_entropy(logits_BTV, labels_BT).mean())


@torch.no_grad()
def denoising_ce_profile(
    model, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, sigmas: list[float],
    generator: torch.Generator,
) -> list[float]:
    """For each sigma, the mean CE (nats/token) of the block owning it for the true next
    tokens, each noisy row the label's clean embedding plus sigma times Gaussian noise
    (the training corruption): how much of the token is decided at that noise level,
    the profile tools/balance_partition.py cuts into equal shares."""
    like = model.tok_embeddings.weight
    ces = []
    for sigma in sigmas:
        noise_BTD = torch.randn((*labels_BT.shape, like.shape[-1]), generator=generator).to(like)
        sigma_B = torch.full((tokens_BT.shape[0],), float(sigma), device=like.device)
        logits_BTV = model(tokens_BT, labels_BT, block=owner_of(model.partition, sigma),
                           noise_BTD=noise_BTD, sigma_B=sigma_B)
        ces.append(float(per_sample_cross_entropy(logits_BTV, labels_BT).mean()))
    return ces


@torch.no_grad()
def single_block_continuations(
    model, prompts_BP: torch.Tensor, sigma: float, new_tokens: int, max_context: int,
    temperature: float = 1.0, seed: int = 0,
) -> torch.Tensor:
    """(B, new_tokens): each prompt continued token by token, every token drawn at
    `temperature` from the logits of the block owning `sigma` given the context and an
    uninformative noisy row at sigma (as teacher_forced_denoising_ce scores it). No
    denoising chain: what that block writes alone."""
    block = owner_of(model.partition, sigma)
    like = model.tok_embeddings.weight

    def block_alone(model, context_BT, config, generator):
        z_BD = uninformative_state((context_BT.shape[0], like.shape[-1]), sigma, generator, like)
        return last_row_denoiser(model, context_BT)(z_BD, sigma, block)

    decoding = DecodingConfig(max_new_tokens=new_tokens, temperature=temperature, seed=seed)
    tokens_BT = generate(model, prompts_BP, decoding, max_context, next_token_logits=block_alone)
    return tokens_BT[:, prompts_BP.shape[1]:]
