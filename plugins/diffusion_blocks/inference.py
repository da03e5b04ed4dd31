"""Loading a trained model for inference (generation, classification, sampling)."""

import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan.distributed import ParallelDims
from torchtitan.protocols.train_spec import get_train_spec


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP step folder (has .metadata), or a checkpoint folder: its latest step-N."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    steps = [
        (int(m.group(1)), p) for p in path.glob("step-*")
        if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / ".metadata").is_file()
    ]
    if not steps:
        raise ValueError(
            f"--checkpoint {path}: no DCP checkpoint there (expected a step-N folder "
            "with a .metadata file, or a folder containing step-N folders)"
        )
    return max(steps)[1]


def load_for_inference(job_config, checkpoint: str | Path, device: str = "cpu"):
    """Build the configured model (single process, no compile) and load its weights.

    Returns (model, tokenizer, step_folder)."""
    from .train import build_model  # the one place a model is built

    job_config.compile.enable = False
    parallel_dims = ParallelDims(
        dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    model, _, spec, _ = build_model(job_config, torch.device(device), parallel_dims)
    step_folder = resolve_checkpoint(checkpoint)
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(step_folder))
    model.load_state_dict(state)
    model.eval()
    tokenizer = spec.build_tokenizer_fn(job_config) if spec.build_tokenizer_fn else None
    return model, tokenizer, step_folder
