"""Measuring a language model and its samples (tools/lm_report.py and the tests).

- `judge_ce`: the mean cross-entropy (nats/token) of continuations given their prompts
  under an end-to-end judge model (generative perplexity);
- `distinct_n`, `unigram_entropy`: the diversity of a set of continuations;
- `judge_features` and `mauve_score`: MAUVE between two sets of continuations, on the
  judge's final hidden states mean-pooled over the continuation;
- `teacher_forced_denoising_ce`: the block owning sigma predicts the true next tokens of
  held-out windows from the clean prefix and an uninformative noisy row (the state the
  sampler starts from at that sigma), beside `next_token_ce`, an end-to-end model's
  held-out next-token CE;
- `single_block_continuations`: text that block writes on its own (each token drawn
  from its logits on an uninformative noisy row, no denoising chain), to tell the
  block's quality from the sampling chain's.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ...errors import ConfigError
from ...diffusion.objectives import per_sample_cross_entropy
from .sampler import DecodingConfig, generate, last_row_denoiser, owner_of, uninformative_state


def evenly_spaced_windows(ids: list[int], length: int, count: int) -> torch.Tensor:
    """`count` windows of `length` tokens, evenly spaced over `ids`, (count, length)."""
    if len(ids) < length + 1:
        raise ConfigError(f"the held-out text has {len(ids)} tokens, fewer than a window of {length}")
    starts = torch.linspace(0, len(ids) - length - 1, count).long().tolist()
    return torch.tensor([ids[s:s + length] for s in starts])


# ---------------------------------------------------------------------------
# Samples: judge CE, diversity, MAUVE


@torch.no_grad()
def judge_ce(judge, prompts_BP: torch.Tensor, continuations_BC: torch.Tensor) -> float:
    """Mean CE (nats/token) of the continuations given the prompts, under `judge`."""
    tokens_BT = torch.cat([prompts_BP, continuations_BC], dim=1)
    logits_BCV = judge(tokens_BT[:, :-1])[:, prompts_BP.shape[1] - 1:]
    return float(per_sample_cross_entropy(logits_BCV, continuations_BC).mean())


def ngrams(sequence: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(sequence[i:i + n]) for i in range(len(sequence) - n + 1)]


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (corpus-level distinct-n)."""
    all_ngrams = [g for sequence in sequences for g in ngrams(sequence, n)]
    return len(set(all_ngrams)) / max(len(all_ngrams), 1)


def unigram_entropy(sequences: list[list[int]]) -> float:
    """Entropy (nats) of the tokens' empirical distribution over all sequences."""
    counts = Counter(token for sequence in sequences for token in sequence)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def diversity(sequences: list[list[int]]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(sequences, 1),
        "distinct_2": distinct_n(sequences, 2),
        "distinct_3": distinct_n(sequences, 3),
        "unigram_entropy": unigram_entropy(sequences),
    }


@torch.no_grad()
def judge_features(judge, prompts_BP: torch.Tensor, continuations_BC: torch.Tensor) -> torch.Tensor:
    """The judge's final-norm hidden states mean-pooled over the continuation's
    positions (each has read the prompt and the continuation up to it), (B, D)."""
    captured = []
    hook = judge.norm.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        judge(torch.cat([prompts_BP, continuations_BC], dim=1))
    finally:
        hook.remove()
    return captured[0][:, prompts_BP.shape[1]:].float().mean(1)


def mauve_score(p_features: torch.Tensor, q_features: torch.Tensor, seed: int = 25) -> float:
    """MAUVE (Pillutla et al. 2021, the `mauve-text` package) between two feature sets."""
    try:
        import mauve
    except ImportError:
        raise ConfigError(
            "MAUVE needs the mauve-text package: pip install mauve-text (or -e '.[report]')"
        ) from None
    result = mauve.compute_mauve(
        p_features=p_features.double().numpy(), q_features=q_features.double().numpy(),
        seed=seed, verbose=False,
    )
    return float(result.mauve)


# ---------------------------------------------------------------------------
# Teacher-forced: the model on held-out windows


@torch.no_grad()
def next_token_ce(model, tokens_BT: torch.Tensor, labels_BT: torch.Tensor) -> float:
    """An end-to-end model's mean next-token CE (nats/token)."""
    return float(per_sample_cross_entropy(model(tokens_BT), labels_BT).mean())


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
