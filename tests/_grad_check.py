"""Run under torchrun (gloo, FSDP2 over all ranks): torchtitan's loss convention gives the
single-process gradient.

Every rank builds the same global batch and takes its own rows; the ranks' item counts
differ (rank 1 and up ignore half of their positions). Each rank's loss is its loss
SUM (objectives' LossSums, as the trainer gets them from the task) divided by the
GLOBAL item count; FSDP sums the gradients over ranks (divide factor 1, force-sum on
gloo). That sum must equal the single-process gradient of the mean loss over all the
ranks' rows (a mean of per-rank means would not: the counts differ). Writes the max
relative error to argv[1]."""

import copy
import json
import sys

import torch
import torch.distributed as dist

import diffusion_blocks  # noqa: F401
from diffusion_blocks import titan_compat
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.diffusion.objectives import cross_entropy_sums, weighted_cross_entropy_sums
from diffusion_blocks.inference import build_model, single_process_parallel_dims
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import ParallelDims

ROWS_PER_RANK, SEQ = 2, 32


def global_batch(world: int, vocab: int, dim: int):
    """(inputs, labels, loss_labels, noise, sigma) of all ranks' rows, the same on every rank."""
    g = torch.Generator().manual_seed(123)
    n = ROWS_PER_RANK * world
    tokens = torch.randint(0, vocab, (n, SEQ + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss_labels = labels.clone()
    loss_labels[ROWS_PER_RANK:, : SEQ // 2] = IGNORE_INDEX  # ranks >= 1: fewer items
    noise = torch.randn(n, SEQ, dim, generator=g)
    sigma = 0.05 + 2 * torch.rand(n, generator=g)
    return inputs, labels, loss_labels, noise, sigma


def loss_sums(model, job_config, batch, rows: slice):
    inputs, labels, loss_labels, noise, sigma = (t[rows] for t in batch)
    if job_config.diffusion_blocks.enable:
        logits = model(inputs, labels, block=1, sigma_B=sigma, noise_BTD=noise)
        return weighted_cross_entropy_sums(
            logits, loss_labels, sigma, model.partition.schedule.sigma_data
        )
    return cross_entropy_sums(model(inputs), loss_labels)


def gradients(model, job_config, batch, rows: slice, global_items: torch.Tensor):
    sums = loss_sums(model, job_config, batch, rows)
    (sums.loss_sum / global_items).backward()
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for name, p in model.named_parameters() if p.grad is not None
    }


def main(out_path, *args):
    job_config = parse_job_config(list(args))
    titan_compat.use_device("cpu")
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    p = job_config.parallelism
    dims = ParallelDims(
        dp_shard=p.data_parallel_shard_degree, dp_replicate=p.data_parallel_replicate_degree,
        cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world,
    )
    torch.manual_seed(0)
    sharded, model_args, _ = build_model(job_config, device, dims)
    reference_config = copy.deepcopy(job_config)
    reference_config.parallelism.data_parallel_shard_degree = 1
    reference_config.diffusion_blocks.offload_inactive_blocks = "off"  # the reference is resident
    single, *_ = build_model(reference_config, device, single_process_parallel_dims())
    single.load_state_dict({k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                            for k, v in sharded.state_dict().items()})

    batch = global_batch(world, model_args.vocab_size, model_args.dim)
    items_per_rank = (batch[2] != IGNORE_INDEX).view(world, -1).sum(1)
    assert len(set(items_per_rank.tolist())) > 1, items_per_rank  # the counts differ
    global_items = items_per_rank.sum().float()
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    got = gradients(sharded, job_config, batch, mine, global_items)
    expected = gradients(single, reference_config, batch, slice(None), global_items)
    assert got.keys() == expected.keys() and got
    error = max(float((got[k] - expected[k]).norm() / expected[k].norm().clamp_min(1e-12))
                for k in got if expected[k].norm() > 0)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"max_relative_error": error, "num_grads": len(got)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
