"""Training throughput: DiffusionBlocks vs end to end, same model and batch.

    python tools/bench/throughput.py --job.config_file train_configs/llama3_debug.toml \
        [--num-blocks 4] [--steps 20] [--warmup 5] [--modes eager,compiled] [--json]

Runs the real trainer's train_step (data loading included) for each of end-to-end and
DiffusionBlocks, eager and compiled, and prints items/s (tokens for the LM, images for
vision), the DiffusionBlocks / end-to-end ratio and, on CUDA, model FLOPs utilisation
(FLOPs of one forward+backward counted with FlopCounterMode; peak from
torchtitan's table). Wall-clock figures: noisy on shared machines, never used in tests.
"""

import argparse
import gc
import json
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, choice_list_arg, NON_NEGATIVE, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import exit_on_config_error
from diffusion_blocks.train import BlockwiseTrainer, use_single_process_env
from torchtitan.tools.utils import get_peak_flops


def step_flops(trainer: BlockwiseTrainer) -> float:
    """FLOPs of one training forward+backward on the local batch (counted by dispatch)."""
    batch = trainer.job_config.training.local_batch_size
    inputs, labels = next(iter(trainer.dataloader))
    inputs = {k: v[:batch].to(trainer.device) for k, v in inputs.items()}
    labels = labels[:batch].to(trainer.device)
    task = trainer.family.task
    with FlopCounterMode(display=False) as counter:
        if trainer.enabled:
            sigma = torch.ones(labels.shape[0], device=trainer.device)
            out = task.denoiser_loss(trainer.model, inputs, labels, 0, sigma, trainer.noise_generator)
        else:
            out = task.end_to_end_loss(trainer.model, inputs, labels, {}, trainer.noise_generator)
        (out.loss_sum / out.num_items).backward()  # the mean loss over the batch
    trainer.optimizers.zero_grad()
    return float(counter.get_total_flops())


def measure(config_args: list[str], steps: int, warmup: int) -> dict:
    job_config = parse_job_config(config_args, reads_data=True)
    job_config.checkpoint.enable = False
    job_config.metrics.enable_tensorboard = False
    trainer = BlockwiseTrainer(job_config)
    # as the trainer's train() iterates (counts items into ntokens_seen)
    data_iterator = trainer.batch_generator(trainer.dataloader)
    try:
        for _ in range(warmup):
            trainer.step += 1
            trainer.train_step(data_iterator)
        items_before = trainer.ntokens_seen
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step += 1
            trainer.train_step(data_iterator)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        # ntokens_seen counts this rank's items (tokens, or images for vision)
        items_per_s = (trainer.ntokens_seen - items_before) / elapsed
        mfu = None
        if trainer.device.type == "cuda":
            flops_per_step = step_flops(trainer)
            peak = get_peak_flops(torch.cuda.get_device_name(trainer.device))
            mfu = flops_per_step * steps / elapsed / peak
    finally:
        trainer.close()
        # the trainer is in a cycle (CheckpointManager holds it as train_state): free
        # this configuration's model and optimizer before building the next
        del trainer, data_iterator
        gc.collect()
    return {"items_per_s": items_per_s, "seconds_per_step": elapsed / steps, "mfu": mfu}


@exit_on_config_error
def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-blocks", type=number_arg(int, AT_LEAST_1), default=4)
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=20)
    parser.add_argument("--warmup", type=number_arg(int, NON_NEGATIVE), default=5)
    parser.add_argument("--modes", type=choice_list_arg(("eager", "compiled")), default="eager,compiled")
    parser.add_argument("--json", action="store_true")
    args, config_args = parser.parse_known_args(argv)
    use_single_process_env()
    rows = []
    for mode in args.modes:
        compile_args = ["--compile.enable"] if mode == "compiled" else ["--compile.no_enable"]
        e2e = measure(config_args + compile_args + ["--diffusion_blocks.no_enable"],
                      args.steps, args.warmup)
        dblocks = measure(config_args + compile_args + [
            "--diffusion_blocks.num_blocks", str(args.num_blocks)], args.steps, args.warmup)
        rows.append({"compile": mode, "mode": "e2e", "num_blocks": 1, **e2e, "ratio_to_e2e": 1.0})
        rows.append({"compile": mode, "mode": "dblocks", "num_blocks": args.num_blocks, **dblocks,
                     "ratio_to_e2e": dblocks["items_per_s"] / e2e["items_per_s"]})
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank != 0:
        return
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| compile | mode | B | items/s per device | s/step | DiffusionBlocks / e2e | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['compile']} | {r['mode']} | {r['num_blocks']} | {r['items_per_s']:,.0f} | "
              f"{r['seconds_per_step']:.3f} | {r['ratio_to_e2e']:.2f} | {mfu} |")


if __name__ == "__main__":
    main(sys.argv[1:])
