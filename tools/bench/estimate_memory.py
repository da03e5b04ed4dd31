"""Predict per-device training-step memory before anything is allocated (meta device).

    python tools/bench/estimate_memory.py --job.config_file train_configs/llama3_8b.toml \
        --nproc 8 [--blocks 2,4,8] [--json] [--section.key value ...]

Runs the configured model's real training forward on the meta device, counting the
tensors autograd would save (fused-attention footprint), and adds parameters,
gradients and AdamW state sharded over --nproc FSDP2 processes, plus transient
all-gathered layers and logits. Rows: end to end, then DiffusionBlocks per B.
"""

import argparse
import json
import sys

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, number_arg, number_list_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.memory import estimate_step

GiB = 2**30


def estimate_rows(config_args: list[str], nproc: int, blocks: list[int]) -> list[dict]:
    variants = [("e2e", 1, ["--diffusion_blocks.no_enable"])] + [
        ("dblocks", b, ["--diffusion_blocks.num_blocks", str(b)]) for b in blocks
    ]
    rows = []
    for mode, num_blocks, extra in variants:
        job_config = parse_job_config(config_args + extra)
        estimate = estimate_step(job_config, nproc)
        rows.append({
            "mode": mode, "num_blocks": num_blocks,
            "ac": job_config.activation_checkpoint.mode, "nproc": nproc,
            "activation_bytes": estimate.activation_bytes,
            "resident_bytes": estimate.resident.total,
            "peak_bytes": estimate.peak_bytes,
        })
    e2e_peak = rows[0]["peak_bytes"]
    for row in rows:
        row["ratio_to_e2e"] = row["peak_bytes"] / e2e_peak
    return rows


# image models: their step is not a token sequence (eval/memory.py counts the LM's)
UNSUPPORTED = ("dblocks_vit", "dblocks_dit")


def blocks_for(job_config, blocks: list[int] | None) -> list[int]:
    """The B values to estimate: the flag's, else the family's defaults; one line for
    a model the estimator does not support or a B the family cannot take."""
    name = job_config.model.name
    if name in UNSUPPORTED:
        raise ConfigError(
            f"estimate_memory.py estimates the text families' training steps; {name} is an "
            "image model (not supported)"
        )
    if name == "dblocks_recurrent":
        if blocks is not None and blocks != [1]:
            raise ConfigError(
                f"--blocks {','.join(map(str, blocks))}: dblocks_recurrent trains one block "
                "(its shared core); use --blocks 1 or leave it out"
            )
        return [1]
    return blocks if blocks is not None else [2, 4, 8]


@exit_on_config_error
def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--blocks", type=number_list_arg(int, AT_LEAST_1), default=None,
                        help="B values (default 2,4,8; the recurrent family: 1)")
    parser.add_argument("--json", action="store_true")
    args, config_args = parser.parse_known_args(argv)
    args.blocks = blocks_for(parse_job_config(config_args), args.blocks)
    rows = estimate_rows(config_args, args.nproc, args.blocks)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| mode | B | AC | activations GiB | params+grads+AdamW GiB | est. peak GiB | peak / e2e |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['num_blocks']} | {r['ac']} | {r['activation_bytes'] / GiB:.2f} | "
              f"{r['resident_bytes'] / GiB:.2f} | {r['peak_bytes'] / GiB:.2f} | {r['ratio_to_e2e']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
