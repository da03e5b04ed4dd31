"""The ViT's task: how a batch of images becomes a loss (the denoised label
embedding's w(sigma)-weighted CE, or plain CE on [CLS]) and what validation measures
(test accuracy)."""

import torch

from ...components.dist_utils import sum_over_ranks
from ...data.images import ImageSplit, load_job_split, sharded_batches
from ...diffusion.objectives import cross_entropy_sums, weighted_cross_entropy_sums
from ...protocols.task import EVAL_SEED, EvalContext




@torch.no_grad()
def count_correct(
    model, split: ImageSplit, batch_size: int, device: torch.device,
    dp_rank: int = 0, dp_degree: int = 1, seed: int = EVAL_SEED,
) -> tuple[int, int]:
    """(correct, counted) over this rank's share of `split`, by `model.classify`
    (Euler sampling of the label for the denoiser, plain argmax for the baseline)."""
    generator = torch.Generator(device).manual_seed(seed + dp_rank)
    correct = counted = 0
    for images, labels, valid in sharded_batches(split, batch_size, dp_rank, dp_degree):
        logits = model.classify(images.to(device), generator=generator)
        hits = (logits.argmax(-1).cpu() == labels) & valid
        correct += int(hits.sum())
        counted += int(valid.sum())
    return correct, counted


class ImageClassificationTask:
    """ViT: the denoiser denoises the label embedding; the baseline is CE on [CLS]."""

    unweighted_name = "ce"

    def denoiser_loss(self, model, inputs, labels, block, sigma_B, generator):
        noise_BD = torch.randn(
            labels.shape[0], model.model_args.dim, generator=generator, device=labels.device
        )
        out = model(
            inputs["input"], block=block, sigma_B=sigma_B, labels_B=labels, noise_BD=noise_BD
        )
        return weighted_cross_entropy_sums(
            out.logits_BK[:, None], labels[:, None], sigma_B, model.partition.schedule.sigma_data
        )

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        logits_BK = model(inputs["input"])
        return cross_entropy_sums(logits_BK[:, None], labels[:, None])

    def evaluate(self, model, ctx: EvalContext) -> dict[str, float]:
        split = load_job_split(ctx.job_config, "test")
        correct, counted = count_correct(
            model, split, ctx.job_config.validation.local_batch_size, ctx.device,
            ctx.dp_rank, ctx.dp_degree,
        )
        totals = torch.tensor((correct, counted), dtype=torch.float64, device=ctx.device)
        correct, counted = sum_over_ranks(totals).tolist()
        return {"eval/test_accuracy": correct / max(counted, 1)}
