"""A PNG grid of class-conditional DiT samples, one row per class.

    python tools/sample_images.py --job.config_file train_configs/dit_digits.toml \
        --checkpoint outputs/dit_digits/checkpoint [--steps 50] [--sampler euler|heun] \
        [--cfg-scale 2.0] [--per-class 8] [--classes 0,1,2] [--scale 4] [--seed 0] [--out grid.png]

--checkpoint is a step-N folder or a checkpoint folder (its newest step-N is used).
Euler or Heun steps over the equi-probability sigma grid; each network evaluation runs
only the block owning its sigma (the end-to-end twin has one block holding every layer).
A Heun step evaluates twice, so --steps N costs 2N evaluations.
"""

import argparse
import sys

import torch

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.bounds import (
    AT_LEAST_1,
    device_arg,
    NON_NEGATIVE,
    number_arg,
    number_list_arg,
    output_file_arg,
    SEED,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.diffusion.sampling import network_evaluations, ODE_SAMPLERS
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.image_grid import make_grid, save_png
from diffusion_blocks.inference import expect_model, load_model


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=None,
                        help="default: [diffusion_blocks] sampling_steps")
    parser.add_argument("--sampler", choices=list(ODE_SAMPLERS), default=None,
                        help="default: [diffusion_blocks] sampler")
    parser.add_argument("--cfg-scale", type=number_arg(float, NON_NEGATIVE), default=None,
                        help="default: [diffusion_blocks] cfg_scale")
    parser.add_argument("--per-class", type=number_arg(int, AT_LEAST_1), default=8)
    parser.add_argument("--classes", type=number_list_arg(int, NON_NEGATIVE), default=None,
                        help="comma-separated; default: the first 10")
    parser.add_argument("--scale", type=number_arg(int, AT_LEAST_1), default=4,
                        help="pixel enlargement in the PNG")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=0)
    parser.add_argument("--out", type=output_file_arg, default="grid.png")
    parser.add_argument("--device", type=device_arg, default="cpu")
    return parser.parse_known_args(argv)


def class_list(classes: list[int] | None, num_classes: int) -> list[int]:
    if classes is None:
        return list(range(min(num_classes, 10)))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"--classes {bad}: classes must lie in [0, {num_classes})")
    return classes


@exit_on_config_error
def main(argv=None) -> None:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    job_config = parse_job_config(config_args)
    expect_model(job_config, "dblocks_dit", "tools/sample_images.py")
    section = job_config.diffusion_blocks
    steps = args.steps or section.sampling_steps
    cfg_scale = section.cfg_scale if args.cfg_scale is None else args.cfg_scale
    sampler = args.sampler or section.sampler
    device = torch.device(args.device)
    model, _ = load_model(job_config, args.checkpoint, device)
    classes = class_list(args.classes, model.model_args.num_classes)
    labels = torch.tensor(classes, device=device).repeat_interleave(args.per_class)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = model.sample(labels, steps, cfg_scale, generator, sampler)
    path = save_png(make_grid(images.cpu(), rows=len(classes), scale=args.scale), args.out)
    nfe = network_evaluations(sampler, model.partition.sampling_plan(steps))
    print(f"wrote {path}: {len(classes)} classes x {args.per_class} samples, {steps} "
          f"{sampler} steps ({nfe} network evaluations), cfg scale {cfg_scale}")


if __name__ == "__main__":
    main()
