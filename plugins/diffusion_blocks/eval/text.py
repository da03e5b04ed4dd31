"""Measuring a language model and its samples (tools/reports/lm.py, recurrent.py and the
tests).

- `judge_ce`: the mean cross-entropy (nats/token) of continuations given their prompts
  under an end-to-end judge model (generative perplexity);
- `distinct_n`, `unigram_entropy`: the diversity of a set of continuations;
- `judge_features` and `mauve_score`: MAUVE between two sets of continuations, on the
  judge's final hidden states mean-pooled over the continuation;
- `next_token_ce`: an end-to-end model's held-out next-token CE;
- `sample_rows`, `score`, `teacher_forced`: the LM report's rows of samples, the scores
  of one set of continuations, and every model teacher-forced on held-out windows (the
  denoiser's blocks with models/llama3/evaluation.py's probe).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch

from ..diffusion.objectives import per_sample_cross_entropy
from ..errors import ConfigError
from ..models.llama3 import evaluation
from ..models.llama3.sampler import DecodingConfig, is_denoiser, owner_of

TEACHER_FORCED_SEED = 1234


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
        import mauve  # optional third-party package (the [report] extra): imported on use
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

# ---------------------------------------------------------------------------
# The LM report's rows and scores


def sample_rows(args, models: dict) -> dict[str, tuple[str, DecodingConfig]]:
    """row -> (model name, decoding) of every set of samples to draw."""
    rows = {}
    for name, model in models.items():
        if name.startswith("judge"):  # the judges are scored, never sampled
            continue
        if not is_denoiser(model):
            rows |= {f"{name} T={t}": (name, DecodingConfig(max_new_tokens=args.new_tokens, temperature=t))
                     for t in args.temperatures}
            continue
        rows |= {
            f"{name} {sampler} {steps}/block": (name, DecodingConfig(
                max_new_tokens=args.new_tokens, steps_per_block=steps, sampler=sampler))
            for sampler in args.samplers for steps in args.steps_per_block
        }
    return rows


def score(judge, prompts, continuations, real_features, tokenizer, model=None, decoding=None) -> dict:
    features = judge_features(judge, prompts, continuations)
    return {
        "model": model,
        "decoding": dataclasses.asdict(decoding) if decoding else None,
        "judge_ce": judge_ce(judge, prompts, continuations),
        **diversity(continuations.tolist()),
        "mauve": mauve_score(real_features, features),
        "example": tokenizer.decode(prompts[0].tolist()) + " || "
        + tokenizer.decode(continuations[0].tolist()),
    }


def teacher_forced(models: dict, windows, sigmas) -> dict:
    tokens, labels = windows[:, :-1], windows[:, 1:]
    results = {}
    for name, model in models.items():
        if not is_denoiser(model):
            results[name] = {"next_token_ce": next_token_ce(model, tokens, labels)}
            continue
        generator = torch.Generator().manual_seed(TEACHER_FORCED_SEED)
        results[name] = {"sigma_ce": {
            f"{sigma:g}": {
                "block": owner_of(model.partition, sigma),
                "ce": evaluation.teacher_forced_denoising_ce(model, tokens, labels, sigma, generator),
            }
            for sigma in sigmas
        }}
    return results
