"""Quality of a DiT checkpoint without downloads: a small CNN trained here on the
config's training split judges class-conditional samples.

    python tools/eval_dit.py --job.config_file train_configs/dit_digits.toml \
        --checkpoint outputs/dit_digits/checkpoint [--samples-per-class 50] \
        [--steps 50] [--sampler euler|heun] [--cfg-scale 2.0 ...] [--grid grid.png] [--json] [--section.key value ...]

Reports, per CFG scale: the judge's accuracy on the samples (does it see the class the
sample was conditioned on?) and the Frechet distance between the judge's penultimate
features of the samples and of the held-out test images. For scale: the judge's own
test accuracy, and the Frechet distance of real training images (as many as the
samples) to the same test images, the floor a perfect generator would reach.
The judge is deterministic (fixed seed), so separate runs use the same judge.
"network_evaluations" counts the denoiser calls of one sample (--steps for Euler, twice
that for Heun; a CFG pair is one batched call).
"""

import argparse
import json
import sys
import time

import torch

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.bounds import (
    AT_LEAST_1,
    NON_NEGATIVE,
    number_arg,
    output_file_arg,
    SEED,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.images import load_job_split, subset
from diffusion_blocks.diffusion.sampling import network_evaluations, ODE_SAMPLERS
from diffusion_blocks.errors import exit_on_config_error
from diffusion_blocks.eval.image_grid import make_grid, save_png
from diffusion_blocks.eval.images import (
    features_and_predictions,
    frechet_distance,
    judge_samples,
    train_feature_cnn,
)
from diffusion_blocks.inference import expect_model, load_model


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--samples-per-class", type=number_arg(int, AT_LEAST_1), default=50)
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=None,
                        help="default: [diffusion_blocks] sampling_steps")
    parser.add_argument("--sampler", choices=list(ODE_SAMPLERS), default=None,
                        help="default: [diffusion_blocks] sampler")
    parser.add_argument(
        "--cfg-scale", type=number_arg(float, NON_NEGATIVE), nargs="+", default=None,
        help="one or more scales; default: [diffusion_blocks] cfg_scale",
    )
    parser.add_argument("--batch-size", type=number_arg(int, AT_LEAST_1), default=250,
                        help="samples drawn at once")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=0)
    parser.add_argument("--grid", type=output_file_arg, default=None,
                        help="also write a PNG grid (8 per class, first scale)")
    parser.add_argument("--json", action="store_true")
    return parser.parse_known_args(argv)


def draw_samples(model, classes, steps, cfg_scale, seed, batch_size, sampler):
    generator = torch.Generator().manual_seed(seed)
    chunks = [
        model.sample(classes[i : i + batch_size], steps, cfg_scale, generator, sampler)
        for i in range(0, len(classes), batch_size)
    ]
    return torch.cat(chunks)


def real_floor(judge, train, test, count: int, seed: int) -> float:
    """FD of `count` random real training images to the test images."""
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    real_features, _ = features_and_predictions(judge, subset(train, pick).images_NCHW)
    test_features, _ = features_and_predictions(judge, test.images_NCHW)
    return frechet_distance(real_features, test_features)


@exit_on_config_error
def main(argv=None) -> None:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    job_config = parse_job_config(config_args, reads_data=True)
    expect_model(job_config, "dblocks_dit", "tools/eval_dit.py")
    section = job_config.diffusion_blocks
    steps = args.steps or section.sampling_steps
    scales = args.cfg_scale or [section.cfg_scale]
    sampler = args.sampler or section.sampler
    train, test = load_job_split(job_config, "train"), load_job_split(job_config, "test")
    model, _ = load_model(job_config, args.checkpoint, torch.device("cpu"))
    num_classes = model.model_args.num_classes

    started = time.perf_counter()
    judge = train_feature_cnn(train, num_classes)
    _, test_predictions = features_and_predictions(judge, test.images_NCHW)
    classes = torch.arange(num_classes).repeat_interleave(args.samples_per_class)
    result = {
        "checkpoint": str(args.checkpoint),
        "diffusion_blocks": section.enable,
        "num_blocks": model.partition.num_blocks,
        "sampling_steps": steps,
        "sampler": sampler,
        "network_evaluations": network_evaluations(sampler, model.partition.sampling_plan(steps)),
        "num_samples": len(classes),
        "judge_test_accuracy": float((test_predictions == test.labels_N).float().mean()),
        "real_train_frechet_distance": real_floor(judge, train, test, len(classes), args.seed),
        "by_cfg_scale": {},
    }
    for scale in scales:
        samples = draw_samples(model, classes, steps, scale, args.seed, args.batch_size, sampler)
        quality = judge_samples(judge, samples, classes, test)
        result["by_cfg_scale"][str(scale)] = {
            "sample_accuracy": quality.sample_accuracy,
            "frechet_distance": quality.frechet_distance,
        }
    if args.grid:
        grid_classes = torch.arange(min(num_classes, 10)).repeat_interleave(8)
        images = draw_samples(
            model, grid_classes, steps, scales[0], args.seed, args.batch_size, sampler
        )
        result["grid"] = str(save_png(make_grid(images, rows=len(grid_classes) // 8, scale=4), args.grid))
    result["seconds"] = time.perf_counter() - started

    if args.json:
        print(json.dumps(result))
        return
    mode = "DiffusionBlocks" if section.enable else "end-to-end"
    print(f"{mode} DiT ({result['num_blocks']} block(s)), {len(classes)} samples, {steps} "
          f"{sampler} steps ({result['network_evaluations']} network evaluations)")
    print(f"  judge CNN test accuracy {result['judge_test_accuracy']:.4f}; "
          f"real train images vs test: Frechet distance {result['real_train_frechet_distance']:.2f}")
    for scale, q in result["by_cfg_scale"].items():
        print(f"  cfg {scale}: sample accuracy {q['sample_accuracy']:.4f}, "
              f"Frechet distance {q['frechet_distance']:.2f}")
    if args.grid:
        print(f"  grid: {result['grid']}")


if __name__ == "__main__":
    main()
