"""Tasks of the vision families: how a batch of images becomes a loss, and what the
loop's evaluation hook measures (test accuracy of the ViT, a sample grid of the DiT)."""

from pathlib import Path

import torch
import torch.distributed as dist

from .data.images import ImageSplit, load_job_split, sharded_batches
from .image_grid import make_grid, save_png, tensorboard_writers
from .objectives import cross_entropy_sums, weighted_cross_entropy_sums, weighted_squared_error_sums
from .tasks import EvalContext

EVAL_SEED = 1234
GRID_CLASSES = 10      # sample-grid rows (the first classes when there are more)
GRID_PER_CLASS = 8     # sample-grid columns


def _sum_over_ranks(*values: float, device: torch.device) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


# ---------------------------------------------------------------------------
# ViT


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
        correct, counted = _sum_over_ranks(correct, counted, device=ctx.device)
        return {"eval/test_accuracy": correct / max(counted, 1)}


# ---------------------------------------------------------------------------
# DiT


def grid_classes(num_classes: int, per_class: int, device) -> torch.Tensor:
    """Class of each grid image: one row per class."""
    rows = min(num_classes, GRID_CLASSES)
    return torch.arange(rows, device=device).repeat_interleave(per_class)


class ImageGenerationTask:
    """DiT: EDM denoising of images, w(sigma)-weighted squared error, label dropout."""

    unweighted_name = "mse"

    def denoiser_loss(self, model, inputs, labels, block, sigma_B, generator):
        x_BCHW = inputs["input"]
        noise_BCHW = torch.randn(x_BCHW.shape, generator=generator, device=x_BCHW.device)
        z_BCHW = x_BCHW + sigma_B.to(x_BCHW.dtype)[:, None, None, None] * noise_BCHW
        classes_B = model.drop_labels(labels, generator)
        denoised_BCHW = model(z_BCHW, sigma_B, classes_B, block=block)
        return weighted_squared_error_sums(
            denoised_BCHW, x_BCHW, sigma_B, model.partition.schedule.sigma_data
        )

    def end_to_end_loss(self, model, inputs, labels, extra_kwargs, generator):
        """One block with every layer; sigma from the global truncated log-normal."""
        sigma_B = model.partition.sample_training_sigmas(0, labels.shape[0], generator)
        return self.denoiser_loss(
            model, inputs, labels, 0, sigma_B.to(labels.device, torch.float32), generator
        )

    def evaluate(self, model, ctx: EvalContext) -> dict[str, float]:
        """A grid of class-conditional samples (one row per class) to TensorBoard and
        <dump_folder>/samples/step-N.png. Every rank samples (FSDP), rank 0 writes."""
        section = ctx.job_config.diffusion_blocks
        generator = torch.Generator(ctx.device).manual_seed(EVAL_SEED)
        classes = grid_classes(model.model_args.num_classes, GRID_PER_CLASS, ctx.device)
        images = model.sample(classes, section.sampling_steps, section.cfg_scale, generator)
        if ctx.dp_rank == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
            grid = make_grid(images.cpu(), rows=int(classes.max()) + 1, scale=4)
            save_png(grid, Path(ctx.job_config.job.dump_folder) / "samples" / f"step-{ctx.step}.png")
            for writer in tensorboard_writers(ctx.metric_logger):
                writer.add_image("eval/samples", grid, ctx.step, dataformats="HWC")
                writer.flush()
        return {"eval/sample_abs_mean": float(images.abs().mean())}
