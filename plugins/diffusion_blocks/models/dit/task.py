"""The DiT's task: EDM denoising of images (w(sigma)-weighted squared error, label
dropout) and what validation writes (a grid of class-conditional samples)."""

from pathlib import Path

import torch
import torch.distributed as dist

from ...diffusion.objectives import weighted_squared_error_sums
from ...eval.image_grid import make_grid, save_png, tensorboard_writers
from ...protocols.task import EVAL_SEED, EvalContext

GRID_CLASSES = 10      # sample-grid rows (the first classes when there are more)
GRID_PER_CLASS = 8     # sample-grid columns


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
        sigma_B = model.partition.sample_training_levels(0, labels.shape[0], generator)
        return self.denoiser_loss(
            model, inputs, labels, 0, sigma_B.to(labels.device, torch.float32), generator
        )

    def evaluate(self, model, ctx: EvalContext) -> dict[str, float]:
        """A grid of class-conditional samples (one row per class) to TensorBoard and
        <dump_folder>/samples/step-N.png. Every rank samples (FSDP), rank 0 writes."""
        section = ctx.job_config.diffusion_blocks
        generator = torch.Generator(ctx.device).manual_seed(EVAL_SEED)
        classes = grid_classes(model.model_args.num_classes, GRID_PER_CLASS, ctx.device)
        images = model.sample(
            classes, section.sampling_steps, section.cfg_scale, generator, section.sampler
        )
        if ctx.dp_rank == 0 and (not dist.is_initialized() or dist.get_rank() == 0):
            grid = make_grid(images.cpu(), rows=int(classes.max()) + 1, scale=4)
            save_png(grid, Path(ctx.job_config.job.dump_folder) / "samples" / f"step-{ctx.step}.png")
            for writer in tensorboard_writers(ctx.metric_logger):
                writer.add_image("eval/samples", grid, ctx.step, dataformats="HWC")
                writer.flush()
        return {"eval/sample_abs_mean": float(images.abs().mean())}
