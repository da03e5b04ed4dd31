"""The sampler's held-out cross-entropy of a DiffusionBlocks LM checkpoint, and where along
its chain the next byte is decided (`eval.sampler_ce`: the estimator, its convergence in
the number of chains, and the decision profile).

    python tools/eval_sampler_ce.py --job.config_file train_configs/llama3_shakespeare.toml \
        --checkpoint outputs/llama3_shakespeare/checkpoint --data ../shared/data/tinyshakespeare.txt \
        [--twin-checkpoint E2E_CHECKPOINT] [--ce-windows 8] [--chains 64] [--chains-per-call 4] \
        [--sampler ancestral] [--steps-per-block 1] [--stop-sigma S] [--seed 0] \
        [--split-draws D] [--json] \
        [--section.key value ...]

The held-out text is the last 10% of --data (cut at a line break: the split of
tools/reports/lm.py, so --ce-windows N gives the report's windows), --ce-windows windows
of [training] seq_len + 1 tokens evenly spaced over it. Every position's next token runs
the sampler's chain --chains times; the CE of the averaged final softmax is the
sampler's held-out CE, given at K/4, K/2 and K chains (it falls with K until it has
converged). For the ancestral sampler the first --split-draws draws (default 4: every
draw at 1 step per block with B = 4) are split on the true token (`split_draws`: the
chains run in groups of 2^D, unbiased, far fewer chains needed; --chains a multiple of
2^D); other samplers' chains are read as they run. The profile gives the same estimator at every state of the chain, read by
the block owning its sigma: point j is the CE of the sampler stopped there
(`--stop-sigma` its sigma), and each block's last point shows what the chain knows when
that block is done. --twin-checkpoint: an end-to-end checkpoint of the same config
(read with `--diffusion_blocks.no_enable`) whose next-token CE on the same positions is
printed beside it. --json prints one object: the estimate, its profile, block_end_ce,
block_loss and twin_ce.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.bounds import (
    AT_LEAST_1, existing_file_arg, NON_NEGATIVE, number_arg, POSITIVE, SEED,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import check_text_file
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.sampler_ce import block_ends, block_losses, sampler_heldout_ce
from diffusion_blocks.eval.text import evenly_spaced_windows
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3.sampler import DecodingConfig, DEFAULT_SAMPLER, TOKEN_STEPS

HELDOUT_FRACTION = 0.1


def heldout_text(path: Path) -> str:
    """The last 10% of the file from the line break before it (tools/reports/common.py's
    split_corpus)."""
    text = path.read_text(encoding="utf-8")
    return text[text.rfind("\n", 0, int(len(text) * (1 - HELDOUT_FRACTION))) + 1:]


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="the DiffusionBlocks checkpoint")
    parser.add_argument("--data", type=existing_file_arg, required=True,
                        help="a UTF-8 text file; its last 10%% is the held-out text")
    parser.add_argument("--twin-checkpoint", default=None,
                        help="an end-to-end checkpoint of the same config, scored beside it")
    parser.add_argument("--ce-windows", type=number_arg(int, AT_LEAST_1), default=8)
    parser.add_argument("--chains", type=number_arg(int, AT_LEAST_1), default=64)
    parser.add_argument("--chains-per-call", type=number_arg(int, AT_LEAST_1), default=4,
                        help="chains run as one batch (memory)")
    parser.add_argument("--sampler", choices=sorted(TOKEN_STEPS), default=DEFAULT_SAMPLER)
    parser.add_argument("--steps-per-block", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--stop-sigma", type=number_arg(float, POSITIVE), default=None,
                        help="stop every chain at the lowest grid sigma >= this")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=0)
    parser.add_argument("--split-draws", type=number_arg(int, NON_NEGATIVE), default=4,
                        help="ancestral sampler: its first D draws split on the true token "
                             "(0: plain chains; ignored by the other samplers)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_known_args(argv)


def print_result(result, twin_ce) -> None:
    by_k = ", ".join(f"K={k}: {ce:.4f}" for k, ce in result.ce_by_chains.items())
    print(f"sampler CE {result.ce:.4f} +- {result.stderr:.4f} nats/token ({result.sampler}, "
          f"{result.steps_per_block}/block, {result.split_draws} draws split, {result.positions} "
          f"positions; {by_k}; "
          f"{100 * result.floor_fraction:.2f}% of positions below p = 1e-6)")
    if twin_ce is not None:
        print(f"end-to-end next-token CE {twin_ce:.4f} on the same positions: gap "
              f"{100 * (result.ce - twin_ce) / twin_ce:+.1f}%")
    print("\n| stop at sigma | block | CE at K/4, K/2, K | below 1e-6 |")
    print("|---|---|---|---|")
    for point in result.profile:
        by_k = ", ".join(f"{ce:.4f}" for ce in point.ce_by_chains.values())
        print(f"| {point.sigma:.4g} | {point.block} | {by_k} | {100 * point.floor_fraction:.2f}% |")
    losses = block_losses(result.profile)
    print("\nwhen each block is done: " + "; ".join(
        f"block {b} {p.ce:.4f} ({losses[b]:+.4f})" for b, p in block_ends(result.profile).items()))
    best = result.best_point()
    print(f"best stop: sigma {best.sigma:.4g} (block {best.block}), CE {best.ce:.4f}")


@exit_on_config_error
def main(argv=None) -> None:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    check_text_file(args.data)
    job_config = parse_job_config(config_args)
    model, tokenizer, _ = load_for_inference(job_config, args.checkpoint)
    twin = None
    if args.twin_checkpoint is not None:
        twin_config = parse_job_config([*config_args, "--diffusion_blocks.no_enable"])
        twin, _, _ = load_for_inference(twin_config, args.twin_checkpoint)
    windows_BT = evenly_spaced_windows(
        tokenizer.encode(heldout_text(Path(args.data))), job_config.training.seq_len + 1,
        args.ce_windows,
    )
    try:
        config = DecodingConfig(sampler=args.sampler, steps_per_block=args.steps_per_block,
                                stop_sigma=args.stop_sigma)
        result = sampler_heldout_ce(
            model, windows_BT, config, args.chains, seed=args.seed, twin=twin,
            chains_per_call=args.chains_per_call, split_draws=args.split_draws if args.sampler == "ancestral" else 0,
            on_chains=lambda done: print(f"chains {done}/{args.chains}", file=sys.stderr, flush=True),
        )
    except ValueError as e:
        raise ConfigError(f"tools/eval_sampler_ce.py: {e}") from None
    if args.json:
        print(json.dumps({
            **dataclasses.asdict(result),
            "block_end_ce": {b: p.ce for b, p in block_ends(result.profile).items()},
            "block_loss": block_losses(result.profile),
        }))
    else:
        print_result(result, result.twin_ce)


if __name__ == "__main__":
    main()
