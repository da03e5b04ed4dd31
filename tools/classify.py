"""Test accuracy of a ViT checkpoint (the DiffusionBlocks denoiser or its end-to-end
twin: whichever the config's `[diffusion_blocks] enable` says).

    python tools/classify.py --job.config_file train_configs/vit_digits.toml \
        --checkpoint outputs/vit_digits/checkpoint [--split test] [--json] \
        [--batch-size 256] [--steps-per-block K] [--sampler euler|heun] [--section.key value ...]

--checkpoint is a step-N folder or a checkpoint folder (its newest step-N is used).
The denoiser classifies by Euler (or Heun) sampling of the label embedding
([diffusion_blocks] sampling_steps_per_block steps per block and sampler, unless
--steps-per-block / --sampler are given; a Heun step costs two network evaluations).
"""

import argparse
import json
import sys

import torch

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.bounds import AT_LEAST_1, device_arg, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.images import load_job_split
from diffusion_blocks.diffusion.sampling import ODE_SAMPLERS
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.inference import load_model
from diffusion_blocks.models.vit.task import count_correct


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batch-size", type=number_arg(int, AT_LEAST_1), default=256)
    parser.add_argument("--steps-per-block", type=number_arg(int, AT_LEAST_1), default=None)
    parser.add_argument("--sampler", choices=list(ODE_SAMPLERS), default=None,
                        help="default: [diffusion_blocks] sampler")
    parser.add_argument("--device", type=device_arg, default="cpu")
    return parser.parse_known_args(argv)


@exit_on_config_error
def main(argv=None) -> None:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    job_config = parse_job_config(config_args, reads_data=True)
    if args.steps_per_block is not None:
        job_config.diffusion_blocks.sampling_steps_per_block = args.steps_per_block
    if args.sampler is not None:
        job_config.diffusion_blocks.sampler = args.sampler
    if not hasattr(job_config, "model") or job_config.model.name != "dblocks_vit":
        raise ConfigError(
            f"tools/classify.py scores dblocks_vit models; the config's [model] name is "
            f"{job_config.model.name!r}"
        )
    device = torch.device(args.device)
    split = load_job_split(job_config, args.split)  # data mistakes before the model is built
    model, _ = load_model(job_config, args.checkpoint, device)
    correct, counted = count_correct(model, split, args.batch_size, device)
    result = {"accuracy": correct / counted, "num_examples": counted}
    if args.json:
        print(json.dumps(result))
    else:
        mode = "DiffusionBlocks" if job_config.diffusion_blocks.enable else "end-to-end"
        print(f"{mode} ViT, {args.split} split: {correct}/{counted} correct, accuracy {result['accuracy']:.4f}")


if __name__ == "__main__":
    main()
