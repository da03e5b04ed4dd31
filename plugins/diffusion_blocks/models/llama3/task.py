"""The autoregressive LM's task: the w(sigma)-weighted CE of the denoised next-token
embeddings, or plain next-token CE for the end-to-end twin. With `[diffusion_blocks]
head_loss = "chunked"` the model's head computes each label's CE itself (no
full-vocabulary logits kept for backward) and the task sums them, weighted the same."""

from functools import partial

import torch

from ...diffusion.objectives import (
    cross_entropy_sums,
    label_ce_sums,
    sigma_loss_weights,
    weighted_cross_entropy_sums,
)
from ..cross_entropy_head import scores_labels_in_head, scoring_labels


@torch.no_grad()
def self_conditioning_input(model, run, generator) -> torch.Tensor:
    """The self-conditioning estimates of a training step (B, T, D): for a share
    `self_conditioning` of the sequences (drawn per sequence) the block's own clean
    estimate from a first pass without one (no gradient), zero for the rest (they
    train the sampler's first step, which has none)."""
    estimate_BTD = model.expected_clean(run())
    batch = estimate_BTD.shape[0]
    draws_B = torch.rand(batch, generator=generator, device=generator.device)
    keep_B = (draws_B < model.options.self_conditioning).to(estimate_BTD.device)
    return estimate_BTD * keep_B[:, None, None].to(estimate_BTD.dtype)


class LanguageModelTask:
    """Autoregressive LM: noisy rows denoise the next tokens' normalised embeddings."""

    unweighted_name = "ce"

    def denoiser_loss(self, model, inputs, labels, block, sigma, generator):
        """sigma: one per sequence (B,), or one per token (B, T) with sigma_per_token;
        each token's CE is weighted by the w(sigma) of its own noisy row."""
        tokens_BT = inputs["input"]
        dim = model.tok_embeddings.weight.shape[-1]
        noise_BTD = torch.randn(
            (*labels.shape, dim), generator=generator, device=labels.device
        )
        sigma_kwarg = {"sigma_BT": sigma} if sigma.dim() == 2 else {"sigma_B": sigma}
        sigma_data = model.partition.schedule.sigma_data

        def run(**self_conditioning):  # self_cond_BTD= only for a model that takes it
            return model(
                tokens_BT, labels, block=block, noise_BTD=noise_BTD, **sigma_kwarg,
                **self_conditioning,
            )

        if model.self_conditions:
            run = partial(run, self_cond_BTD=self_conditioning_input(model, run, generator))

        if scores_labels_in_head(model):
            with scoring_labels(model, labels):
                ce_BT = run()
            return label_ce_sums(ce_BT, labels, sigma_loss_weights(sigma, sigma_data, ce_BT))
        return weighted_cross_entropy_sums(run(), labels, sigma, sigma_data)

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        if scores_labels_in_head(model):
            with scoring_labels(model, labels):
                return label_ce_sums(model(inputs["input"], **extra_kwargs), labels)
        return cross_entropy_sums(model(inputs["input"], **extra_kwargs), labels)
