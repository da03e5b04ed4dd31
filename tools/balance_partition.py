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
For an MD4 model (`dblocks_md4`, the masking process) the level is t: at --points
times evenly spaced inside (0, 1), the block owning t scores the ELBO integrand (w(t)
times the masked tokens' CE, nats per character, `md4.evaluation.elbo_integrand_profile`)
on --windows windows of seq_len characters, and the cut
(`masking.elbo_share_boundaries`) gives each block an equal share of the ELBO, the
integral of that profile over t (the paper's partition: an equal share of the
unmasking events). The same flags train with it (the boundaries are then times).
--json prints {"levels", "profile", "level_name", "sigma_boundaries", "equiprobable_boundaries"}.
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
from diffusion_blocks.diffusion.masking import elbo_share_boundaries
from diffusion_blocks.diffusion.partition import information_balanced_boundaries
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.text import evenly_spaced_windows
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3.evaluation import denoising_ce_profile
from diffusion_blocks.models.md4.evaluation import elbo_integrand_profile
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


def lm_profile(model, ids: list[int], seq_len: int, args) -> tuple[list[float], list[float], list[float]]:
    """(sigmas, denoising CE, information-balanced boundaries) of the block-wise LM."""
    assert is_denoiser(model)
    windows = evenly_spaced_windows(ids, seq_len + 1, args.windows)
    lo, hi = model.partition.boundaries[0], model.partition.boundaries[-1]
    sigmas = log_spaced(lo, hi, args.points)
    generator = torch.Generator().manual_seed(PROFILE_SEED)
    ce = denoising_ce_profile(model, windows[:, :-1], windows[:, 1:], sigmas, generator)
    return sigmas, ce, information_balanced_boundaries(sigmas, ce, args.blocks)


def md4_profile(model, ids: list[int], seq_len: int, args) -> tuple[list[float], list[float], list[float]]:
    """(times, ELBO integrand, equal-ELBO-share boundaries) of the MD4 model."""
    windows = evenly_spaced_windows(ids, seq_len, args.windows)
    times = [(i + 0.5) / args.points for i in range(args.points)]
    nats = elbo_integrand_profile(model, windows, times, seed=PROFILE_SEED)
    return times, nats, elbo_share_boundaries(times, nats, args.blocks)


# [model] name -> (what the profile measures, its function)
PROFILES = {
    "dblocks_llama3": ("denoising CE (nats/token)", lm_profile),
    "dblocks_md4": ("ELBO integrand (nats/char)", md4_profile),
}


@exit_on_config_error
def main(argv):
    args, overrides = parse_args(argv)
    job_config = parse_job_config(["--job.config_file", args.config_file, *overrides])
    if job_config.model.name not in PROFILES:
        raise ConfigError(f"balance_partition.py works on {' and '.join(PROFILES)} models; "
                          f"the config's [model] name is {job_config.model.name!r}")
    if not job_config.diffusion_blocks.enable:
        raise ConfigError("balance_partition.py measures a block-wise model; the config has "
                          "[diffusion_blocks] enable = false")
    check_text_file(args.data)
    model, tokenizer, step_folder = load_for_inference(job_config, args.checkpoint)
    model.eval()
    seq_len = job_config.training.seq_len
    ids = tokenizer.encode(Path(args.data).read_text(encoding="utf-8"))
    args.blocks = args.num_blocks or model.partition.num_blocks
    what, profile = PROFILES[job_config.model.name]
    level = model.partition.level_name
    print(f"{step_folder}: {what} at {args.points} values of {level} on {args.windows} windows "
          f"of {seq_len} tokens...", file=sys.stderr, flush=True)
    try:
        levels, values, cut = profile(model, ids, seq_len, args)
    except ValueError as e:
        raise ConfigError(f"{step_folder}: {e}") from None
    equiprobable = list(model.partition.boundaries[1:-1])
    if args.json:
        print(json.dumps({"levels": levels, "profile": values, "level_name": level,
                          "sigma_boundaries": cut, "equiprobable_boundaries": equiprobable}, indent=1))
        return
    print(f"| {level} | owning block | {what} |\n|---|---|---|")
    for value_at, value in zip(levels, values):
        block = int(model.partition.block_of_level(torch.tensor([value_at], dtype=torch.float64))[0])
        print(f"| {value_at:.4g} | {block} | {value:.3f} |")
    print(f"\nthe trained partition's inner boundaries: {[round(b, 4) for b in equiprobable]}")
    print(f"balanced, B = {args.blocks}: {[round(b, 4) for b in cut]}")
    print("train with: --diffusion_blocks.partition explicit --diffusion_blocks.sigma_boundaries "
          + " ".join(f"{b:.4g}" for b in cut))


if __name__ == "__main__":
    main(sys.argv[1:])
