"""Run under torchrun: every rank computes the same denoiser loss on the same batch;
FSDP2's reduced gradient must equal the single-process gradient (a per-rank mean loss
averaged over ranks is the same mean). Writes the max relative error to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config_loader import parse_job_config
from diffusion_blocks.train import build_model, build_parallel_dims, init_process_group


def gradients(model, job_config):
    torch.manual_seed(123)
    tokens = torch.randint(0, 258, (2, 32))
    noise = torch.randn(2, 32, 256)
    sigma = torch.tensor([0.3, 1.5])
    if job_config.diffusion_blocks.enable:
        logits = model(tokens, tokens, block=1, sigma_B=sigma, noise_BTD=noise)
    else:
        logits = model(tokens)
    logits.float().pow(2).mean().backward()
    return {
        name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
        for name, p in model.named_parameters() if p.grad is not None
    }


def main(out_path, *args):
    job_config = parse_job_config(list(args))
    device = torch.device("cpu")
    world = init_process_group(device, job_config)
    torch.manual_seed(0)
    sharded, *_ = build_model(job_config, device, build_parallel_dims(job_config, world))
    torch.manual_seed(0)
    job_config.parallelism.data_parallel_shard_degree = 1
    job_config.diffusion_blocks.offload_inactive_blocks = "off"  # the reference is resident
    from torchtitan.distributed import ParallelDims

    single_dims = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    single, *_ = build_model(job_config, device, single_dims)
    single.load_state_dict({k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                            for k, v in sharded.state_dict().items()})
    got, expected = gradients(sharded, job_config), gradients(single, job_config)
    assert got.keys() == expected.keys() and got
    error = max(float((got[k] - expected[k]).norm() / expected[k].norm().clamp_min(1e-12))
                for k in got if expected[k].norm() > 0)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"max_relative_error": error, "num_grads": len(got)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
