"""The autoregressive LM's task: the w(sigma)-weighted CE of the denoised next-token
embeddings, or plain next-token CE for the end-to-end twin."""

import torch

from ...objectives import cross_entropy_sums, weighted_cross_entropy_sums


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
        logits = model(tokens_BT, labels, block=block, noise_BTD=noise_BTD, **sigma_kwarg)
        return weighted_cross_entropy_sums(
            logits, labels, sigma, model.partition.schedule.sigma_data
        )

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        return cross_entropy_sums(model(inputs["input"], **extra_kwargs), labels)
