"""Measure training-step memory: end to end vs DiffusionBlocks at several B.

    python tools/bench/memory.py --job.config_file train_configs/llama3_debug.toml \
        [--blocks 2,4,8] [--ac none,full] [--steps 0] [--json] [--section.key value ...]
        [--vary section.key=v1,v2,... ...]

For each configuration it builds the real trainer (same code path as training: FSDP2,
compile, activation checkpointing as configured), runs a few steps on the config's
data and reports, per rank 0:
- activation_bytes: bytes saved for backward in one step (saved-tensor hooks;
  device-independent), the max over the measured steps;
- resident_bytes: parameters + gradients + optimizer state on the training device,
  the max over the measured steps (DiffusionBlocks runs at least B steps with the
  round_robin schedule so every block has optimizer state);
- peak_bytes: torch.cuda.max_memory_allocated on CUDA, null on CPU;
- ratio_to_e2e: (activation + resident) / the end-to-end row's (activation + resident).
Where the training device is not the host (CUDA), every B is measured a second time
with `[diffusion_blocks] offload_inactive_blocks = "on"` (rows with `offload: true`):
the offloaded layers' state then leaves the device, which resident_bytes and
peak_bytes show. On the CPU host and device are one memory, so those rows are skipped.
`--vary section.key=v1,v2` (repeatable) measures every row again for each combination
of the listed values (e.g. the recurrent twin's `recurrent.bptt_steps=1,2,4` and
`recurrent.mean_recurrence=4,8`); each row names its combination under `settings` and
its ratio is to the end-to-end row of the same combination.
Run it under torchrun for several processes; figures are per device.
"""

import argparse
import gc
import itertools
import json
import sys

import torch
import torch.distributed as dist

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import (
    AT_LEAST_1,
    choice_list_arg,
    NON_NEGATIVE,
    number_arg,
    number_list_arg,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import exit_on_config_error
from diffusion_blocks.eval.memory import (
    count_saved_activations,
    estimate_step,
    peak_device_bytes,
    resident_bytes,
)
from diffusion_blocks.train import BlockwiseTrainer, use_single_process_env

MiB = 2**20


AC_MODES = ("none", "full", "selective")  # [activation_checkpoint] mode values it compares


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=number_list_arg(int, AT_LEAST_1), default="2,4,8",
                        help="comma-separated B values")
    parser.add_argument("--ac", type=choice_list_arg(AC_MODES), default="none,full",
                        help="activation checkpointing modes")
    parser.add_argument("--steps", type=number_arg(int, NON_NEGATIVE), default=0,
                        help="steps per configuration (default: max(B, 2))")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--vary", action="append", type=vary_arg, default=[],
                        metavar="SECTION.KEY=V1,V2",
                        help="measure every row at each of these values (repeatable)")
    return parser.parse_known_args(argv)


def vary_arg(text: str) -> tuple[str, list[str]]:
    """'section.key=v1,v2' -> ('section.key', ['v1', 'v2']); the values are checked
    as config values when each configuration is parsed."""
    key, sep, values = text.partition("=")
    section, dot, name = key.partition(".")
    if not (sep and dot and section and name and values) or "" in values.split(","):
        raise argparse.ArgumentTypeError(f"{text!r}: expected section.key=v1,v2,...")
    return key, values.split(",")


def settings_grid(vary: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """[(a.b, [1, 2]), (c.d, [x])] -> [{a.b: 1, c.d: x}, {a.b: 2, c.d: x}]."""
    axes = [[(key, value) for value in values] for key, values in vary]
    return [dict(combination) for combination in itertools.product(*axes)]


def measure(config_args: list[str], steps: int) -> dict:
    job_config = parse_job_config(config_args, reads_data=True)
    estimate = estimate_step(job_config, dist.get_world_size() if dist.is_initialized() else 1)
    job_config.checkpoint.enable = False
    job_config.metrics.enable_tensorboard = False
    job_config.training.global_batch_size = -1
    trainer = BlockwiseTrainer(job_config)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    data_iterator = trainer.batch_generator(trainer.dataloader)  # as train() iterates
    activation, resident = 0, 0
    try:
        for _ in range(steps):
            trainer.step += 1
            with count_saved_activations(trainer.model) as counter:
                trainer.train_step(data_iterator)
            activation = max(activation, counter.bytes)
            resident = max(
                resident, resident_bytes(trainer.model, trainer.optimizers, trainer.device).total
            )
        peak = peak_device_bytes(trainer.device)
        device_type = trainer.device.type
    finally:
        trainer.close()
        # the trainer is in a cycle (CheckpointManager holds it as train_state): free
        # this configuration's model and optimizer before building the next
        del trainer, data_iterator
        gc.collect()
    return {
        "activation_bytes": activation, "resident_bytes": resident, "peak_bytes": peak,
        "estimated_activation_bytes": estimate.activation_bytes,
        "estimated_resident_bytes": estimate.resident.total,
        "estimated_peak_bytes": estimate.peak_bytes,
        "device_type": device_type,
    }


def benchmark_rows(
    argv_config: list[str], blocks: list[int], ac_modes: list[str], steps: int,
    vary: list[str] = (),
):
    rows = []
    for settings in settings_grid(list(vary)):
        setting_args = [a for key, value in settings.items() for a in (f"--{key}", value)]
        for row in benchmark_rows_at(argv_config + setting_args, blocks, ac_modes, steps):
            rows.append({"settings": settings, **row})
    return rows


def benchmark_rows_at(argv_config: list[str], blocks: list[int], ac_modes: list[str], steps: int):
    rows = []
    for ac in ac_modes:
        ac_args = ["--activation_checkpoint.mode", ac]
        e2e = measure(argv_config + ac_args + ["--diffusion_blocks.no_enable"], steps or 2)
        # offloading only moves state where the device is not the host
        offload_modes = [False] if e2e.pop("device_type") == "cpu" else [False, True]
        rows.append({"mode": "e2e", "num_blocks": 1, "ac": ac, "offload": False, **e2e})
        for num_blocks, offload in itertools.product(blocks, offload_modes):
            row = measure(
                argv_config + ac_args + [
                    "--diffusion_blocks.num_blocks", str(num_blocks),
                    "--diffusion_blocks.block_schedule", "round_robin",
                    "--diffusion_blocks.offload_inactive_blocks", "on" if offload else "off",
                ],
                steps or max(num_blocks, 2),
            )
            row.pop("device_type")
            rows.append({"mode": "dblocks", "num_blocks": num_blocks, "ac": ac,
                         "offload": offload, **row})
        e2e_total = e2e["activation_bytes"] + e2e["resident_bytes"]
        for row in rows:
            if row["ac"] == ac:
                row["ratio_to_e2e"] = (row["activation_bytes"] + row["resident_bytes"]) / e2e_total
    return rows


def format_table(rows: list[dict]) -> str:
    varied = any(r.get("settings") for r in rows)
    lines = [
        "| mode | B | AC | offload | " + ("settings | " if varied else "")
        + "activations MiB (est.) | params+grads+AdamW MiB (est.) "
        "| peak MiB (est.) | (act+res) / e2e |",
        "|---|---|---|---|" + ("---|" if varied else "") + "---|---|---|---|",
    ]
    for r in rows:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MiB:.0f}"
        settings = " ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
        lines.append(
            f"| {r['mode']} | {r['num_blocks']} | {r['ac']} | {r['offload']} | "
            + (f"{settings} | " if varied else "") +
            f"{r['activation_bytes'] / MiB:.1f} ({r['estimated_activation_bytes'] / MiB:.1f}) | "
            f"{r['resident_bytes'] / MiB:.1f} ({r['estimated_resident_bytes'] / MiB:.1f}) | "
            f"{peak} ({r['estimated_peak_bytes'] / MiB:.0f}) | {r['ratio_to_e2e']:.3f} |"
        )
    return "\n".join(lines)


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    use_single_process_env()
    rows = benchmark_rows(config_args, args.blocks, args.ac, args.steps, args.vary)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
