"""The information-balanced partition of a trained block-wise LM (issue 21's lever (a)):
sigma boundaries that give each block an equal share of the drop in denoising CE from
sigma_max to sigma_min, measured on text with the model's own blocks.

    python tools/balance_partition.py --job.config_file train_configs/llama3_shakespeare.toml \
        --checkpoint outputs/.../checkpoint --data TRAINING_TEXT [--windows 8] [--points 25] \
        [--num-blocks B] [--json] [--section.key value ...]

For each of --points sigmas, log-spaced over [sigma_min, sigma_max], the block owning it
predicts the true next bytes of --windows windows of --data (seq_len + 1 bytes, evenly
spaced) from the clean prefix and the label's clean embedding noised at that sigma (the
training corruption): `evaluation.denoising_ce_profile`. The profile falls from about
the context-only CE at sigma_max to about 0 at sigma_min; with the paper's
equi-probable partition most blocks own sigmas where the byte is already decided. The
cut (`partition.information_balanced_boundaries`) puts block b's lower boundary where
(b + 1)/B of the drop is done, for --num-blocks blocks (default: the config's). Pass
training text, not the held-out text the result will be reported on. Prints the
profile, the boundaries and the flags that train with them:
    --diffusion_blocks.partition explicit --diffusion_blocks.sigma_boundaries a b c
--json prints {"sigmas", "ce", "sigma_boundaries", "equiprobable_boundaries"}.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, existing_file_arg, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import check_text_file
from diffusion_blocks.diffusion.partition import information_balanced_boundaries
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.text import evenly_spaced_windows
from diffusion_blocks.inference import expect_model, load_for_inference
from diffusion_blocks.models.llama3.evaluation import denoising_ce_profile
from diffusion_blocks.models.llama3.sampler import is_denoiser

REPO = Path(__file__).resolve().parents[1]
PROFILE_SEED = 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job.config_file", dest="config_file",
                        default=str(REPO / "train_configs" / "llama3_shakespeare.toml"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", type=existing_file_arg, required=True)
    parser.add_argument("--windows", type=number_arg(int, AT_LEAST_1), default=8)
    parser.add_argument("--points", type=number_arg(int, AT_LEAST_1), default=25)
    parser.add_argument("--num-blocks", type=number_arg(int, AT_LEAST_1), default=None)
    parser.add_argument("--json", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    if args.points < 2:
        parser.error("--points: need at least 2 sigmas")
    return args, overrides


def log_spaced(lo: float, hi: float, count: int) -> list[float]:
    return [math.exp(math.log(lo) + i / (count - 1) * (math.log(hi) - math.log(lo))) for i in range(count)]


@exit_on_config_error
def main(argv):
    args, overrides = parse_args(argv)
    job_config = parse_job_config(["--job.config_file", args.config_file, *overrides])
    expect_model(job_config, "dblocks_llama3", "balance_partition.py")
    if not job_config.diffusion_blocks.enable:
        raise ConfigError("balance_partition.py measures a block-wise model; the config has "
                          "[diffusion_blocks] enable = false")
    check_text_file(args.data)
    model, tokenizer, step_folder = load_for_inference(job_config, args.checkpoint)
    assert is_denoiser(model)
    model.eval()
    seq_len = job_config.training.seq_len
    ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8"))
    windows = evenly_spaced_windows(ids, seq_len + 1, args.windows)
    lo, hi = model.partition.boundaries[0], model.partition.boundaries[-1]
    sigmas = log_spaced(lo, hi, args.points)
    generator = torch.Generator().manual_seed(PROFILE_SEED)
    print(f"{step_folder}: denoising CE at {len(sigmas)} sigmas on {args.windows} windows "
          f"of {seq_len} tokens...", file=sys.stderr, flush=True)
    ce = denoising_ce_profile(model, windows[:, :-1], windows[:, 1:], sigmas, generator)
    blocks = args.num_blocks or model.partition.num_blocks
    try:
        cut = information_balanced_boundaries(sigmas, ce, blocks)
    except ValueError as e:
        raise ConfigError(f"{step_folder}: {e}") from None
    equiprobable = list(model.partition.boundaries[1:-1])
    if args.json:
        print(json.dumps({"sigmas": sigmas, "ce": ce, "sigma_boundaries": cut,
                          "equiprobable_boundaries": equiprobable}, indent=1))
        return
    print("| sigma | owning block | denoising CE (nats/token) |\n|---|---|---|")
    for sigma, value in zip(sigmas, ce):
        block = int(model.partition.block_of_level(torch.tensor([sigma]))[0])
        print(f"| {sigma:.4g} | {block} | {value:.3f} |")
    print(f"\nthe trained partition's inner boundaries: {[round(b, 4) for b in equiprobable]}")
    print(f"information-balanced, B = {blocks}: {[round(b, 4) for b in cut]}")
    print("train with: --diffusion_blocks.partition explicit --diffusion_blocks.sigma_boundaries "
          + " ".join(f"{b:.4g}" for b in cut))


if __name__ == "__main__":
    main(sys.argv[1:])
