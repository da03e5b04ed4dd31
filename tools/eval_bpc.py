"""Held-out bits per character of a masked-diffusion LM checkpoint (dblocks_md4: the
DiffusionBlocks model or its end-to-end twin, as the config's `[diffusion_blocks]
enable` says): MD4's ELBO bound, estimated by Monte Carlo over t with a fixed seed.

    python tools/eval_bpc.py --job.config_file train_configs/md4_chars.toml \
        --checkpoint outputs/md4_chars/checkpoint [--json] [--draws-per-sequence S] \
        [--max-batches N] [--seed 0] [--section.key value ...]

The held-out text is the config's `[validation]` data (dataset, dataset_path, seq_len,
local_batch_size); --max-batches limits it (default: all of it). t is stratified:
[0, 1] is cut into S strata of equal decrease of alpha_t (S a multiple of the blocks;
default 8 rounded up to one), every held-out sequence gets one uniform t in each, and
the block owning that t evaluates it. Prints the bound and its standard error;
--json prints {"bpc": ..., "stderr": ..., "sequences": ..., "draws_per_sequence": ...}.
--checkpoint is a step-N folder or a checkpoint folder (its newest step-N is used).
"""

import argparse
import dataclasses
import json
import sys

import torch

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.checks import check_validation_seq_len
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.inference import expect_model, load_model
from diffusion_blocks.models.md4.evaluation import heldout_batches, heldout_bpc
from diffusion_blocks.models.md4.task import build_md4_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--draws-per-sequence", type=int, default=None,
                        help="strata of t per held-out sequence (a multiple of num_blocks)")
    parser.add_argument("--max-batches", type=int, default=-1,
                        help="held-out batches of [validation] local_batch_size (-1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    return parser.parse_known_args(argv)


@exit_on_config_error
def main(argv=None) -> None:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    job_config = parse_job_config(config_args)
    expect_model(job_config, "dblocks_md4", "tools/eval_bpc.py")
    check_validation_seq_len(job_config)
    device = torch.device(args.device)
    model, _ = load_model(job_config, args.checkpoint, device)
    loader = build_text_validation_dataloader(1, 0, build_md4_tokenizer(job_config), job_config)
    try:
        estimate = heldout_bpc(
            model, heldout_batches(loader, device, args.max_batches), device,
            seed=args.seed, draws_per_sequence=args.draws_per_sequence,
        )
    except ValueError as e:
        raise ConfigError(f"tools/eval_bpc.py: {e}") from None
    if args.json:
        print(json.dumps(dataclasses.asdict(estimate)))
    else:
        mode = "DiffusionBlocks" if job_config.diffusion_blocks.enable else "end-to-end"
        print(
            f"{mode} MD4: {estimate.bpc:.4f} +- {estimate.stderr:.4f} bits per character "
            f"({estimate.sequences} held-out sequences x {estimate.draws_per_sequence} draws of t)"
        )


if __name__ == "__main__":
    main()
