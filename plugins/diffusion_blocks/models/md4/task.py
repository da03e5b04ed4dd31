"""The masked-diffusion LM's task: MD4's ELBO term as the training loss, and the
held-out bits-per-character bound (evaluation.py) as the validation metric.

Training (one block, t from its interval, or the end-to-end twin, t ~ U(0, 1)): mask
each token with probability 1 - alpha_t, predict, and take

    loss = sum_b w(t_b) * sum_{i masked in row b} -log p(x_i | x_t)

divided by the global token count (the trainer's convention): the ELBO in nats per
token of the block's t-range. The logged CE is the plain CE per MASKED token.
"""

from __future__ import annotations

import torch

from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader

from ...data.text import build_tokenizer, CharTokenizer
from ...diffusion.objectives import LossSums
from ...protocols.task import EVAL_SEED, EvalContext
from .evaluation import elbo_draw, heldout_batches, heldout_bpc


def build_md4_tokenizer(job_config):
    """`[data] tokenizer`; 'auto' is the character (byte) tokenizer."""
    return build_tokenizer(job_config, default=lambda _: CharTokenizer())


class MaskedDiffusionTask:
    """MD4: predict the masked tokens; the ELBO-weighted CE is the loss."""

    unweighted_name = "ce"

    def denoiser_loss(self, model, inputs, labels, block, t_B, generator) -> LossSums:
        draw = elbo_draw(model, inputs["input"], t_B, block, generator)
        return LossSums(draw.nats_B.sum(), draw.masked_ce_BT.sum().detach(), draw.masked_BT.sum())

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator) -> LossSums:
        """All layers, t ~ U(0, 1) (stratified over the batch, as MD4)."""
        t_B = model.partition.sample_training_levels(0, labels.shape[0], generator)
        return self.denoiser_loss(model, inputs, labels, 0, t_B.to(labels.device, torch.float32), generator)

    def evaluate(self, model, ctx: EvalContext) -> dict[str, float]:
        """The held-out BPC bound on `[validation]` data ([validation] steps batches)."""
        tokenizer = build_md4_tokenizer(ctx.job_config)
        loader = build_text_validation_dataloader(
            ctx.dp_degree, ctx.dp_rank, tokenizer, ctx.job_config
        )
        batches = heldout_batches(loader, ctx.device, ctx.job_config.validation.steps)
        estimate = heldout_bpc(model, batches, ctx.device, seed=EVAL_SEED + ctx.dp_rank)
        return {"eval/bpc": estimate.bpc, "eval/bpc_stderr": estimate.stderr}
