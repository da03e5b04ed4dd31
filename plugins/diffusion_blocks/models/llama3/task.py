"""The autoregressive LM's task: the w(sigma)-weighted CE of the denoised next-token
embeddings, or plain next-token CE for the end-to-end twin. With `[diffusion_blocks]
head_loss = "chunked"` the model's head computes each label's CE itself (no
full-vocabulary logits kept for backward) and the task sums them, weighted the same."""

import torch

from ...diffusion.objectives import (
    cross_entropy_sums,
    label_ce_sums,
    sigma_loss_weights,
    weighted_cross_entropy_sums,
)
from ..cross_entropy_head import scores_labels_in_head, scoring_labels


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

        def run():
            return model(tokens_BT, labels, block=block, noise_BTD=noise_BTD, **sigma_kwarg)

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
