"""Show how DiffusionBlocks cuts a model: each block's layers, noise-level interval
(sigma; MD4's masking time t for a dblocks_md4 config), widened training interval and
share of the training distribution.

    python tools/partition.py --num-blocks 3 [--overlap 0.1] [--partition uniform_log]
                              [--n-layers 12] [--json]
    python tools/partition.py --job.config_file train_configs/llama3_debug.toml [--json]
"""

import argparse
import json
import sys

import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.bounds import AT_LEAST_1, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.errors import exit_on_config_error
from diffusion_blocks.registry import resolve_run_spec


def partition_rows(partition: BlockPartition, layers_known: bool) -> list[dict]:
    """One row per block; the interval's keys name the level: sigma_lo / t_lo, ..."""
    level = partition.level_name
    rows = []
    for block in range(partition.num_blocks):
        lo, hi = partition.interval(block)
        train_lo, train_hi = partition.training_interval(block)
        layers = partition.layer_ranges[block]
        rows.append(
            {
                "block": block,
                "layers": [layers.start, layers.stop - 1] if layers_known else None,
                f"{level}_lo": lo,
                f"{level}_hi": hi,
                "train_lo": train_lo,
                "train_hi": train_hi,
                "mass": partition.training_mass(block),
            }
        )
    return rows


def format_table(rows: list[dict], level: str) -> str:
    header = f"{'block':>5}  {'layers':>9}  {level + ' interval':>21}  {'training interval':>21}  {'mass':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        layers = "-" if row["layers"] is None else f"{row['layers'][0]}-{row['layers'][1]}"
        lines.append(
            f"{row['block']:>5}  {layers:>9}  "
            f"[{row[level + '_lo']:8.4g}, {row[level + '_hi']:8.4g}]  "
            f"[{row['train_lo']:8.4g}, {row['train_hi']:8.4g}]  {row['mass']:6.3f}"
        )
    return "\n".join(lines)


def partition_from_flags(argv: list[str]) -> tuple[BlockPartition, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-blocks", type=number_arg(int, AT_LEAST_1), required=True)
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--partition", default="equiprobable")
    parser.add_argument("--n-layers", type=number_arg(int, AT_LEAST_1), default=None,
                        help="model depth; default: one layer per block (layers not shown)")
    args = parser.parse_args(argv)
    section = DiffusionBlocks(
        num_blocks=args.num_blocks, overlap=args.overlap, partition=args.partition
    )
    from diffusion_blocks.config.checks import check_diffusion_blocks

    problems = check_diffusion_blocks(section)
    if problems:
        parser.error("; ".join(f"--{k.replace('_', '-')} {p}" for k, p in problems))
    n_layers = args.n_layers or args.num_blocks
    try:
        return BlockPartition.from_config(section, n_layers), args.n_layers is not None
    except ValueError as e:
        parser.error(str(e))


def partition_from_job_config(argv: list[str]) -> BlockPartition:
    """The partition the config's model builds (over its family's noise process)."""
    job_config = parse_job_config(argv)
    run = resolve_run_spec(job_config)
    n_layers = run.spec.model_args[job_config.model.flavor].n_layers
    noise_levels = run.family.noise_levels(job_config.diffusion_blocks)
    return BlockPartition.from_job_config(job_config, n_layers, noise_levels)


@exit_on_config_error
def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if any(a.split("=")[0] in ("--job.config_file", "--job.config-file") for a in argv):
        partition, layers_known = partition_from_job_config(argv), True
    else:
        partition, layers_known = partition_from_flags(argv)
    rows = partition_rows(partition, layers_known)
    print(json.dumps(rows, indent=2) if as_json else format_table(rows, partition.level_name))


if __name__ == "__main__":
    main(sys.argv[1:])
