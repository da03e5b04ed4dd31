"""The autoregressive LM's task: the w(sigma)-weighted CE of the denoised next-token
embeddings, or plain next-token CE for the end-to-end twin."""

import torch

from ...objectives import cross_entropy_sums, weighted_cross_entropy_sums


class LanguageModelTask:
    """Autoregressive LM: noisy rows denoise the next tokens' normalised embeddings."""

    unweighted_name = "ce"

    def denoiser_loss(self, model, inputs, labels, block, sigma_B, generator):
        tokens_BT = inputs["input"]
        dim = model.tok_embeddings.weight.shape[-1]
        noise_BTD = torch.randn(
            (*labels.shape, dim), generator=generator, device=labels.device
        )
        logits = model(tokens_BT, labels, block=block, sigma_B=sigma_B, noise_BTD=noise_BTD)
        return weighted_cross_entropy_sums(
            logits, labels, sigma_B, model.partition.schedule.sigma_data
        )

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        return cross_entropy_sums(model(inputs["input"], **extra_kwargs), labels)
