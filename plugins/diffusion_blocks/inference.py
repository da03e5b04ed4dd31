"""Loading a trained model for the tools: the train loop's own `build_model` (one
process, no parallelism, no activation checkpointing or compile) plus the model
weights from a torchtitan checkpoint.

torchtitan's CheckpointManager writes a DCP checkpoint whose top-level keys are the
model's parameter names (it flattens the model state into the top level), next to
`optimizer`, `lr_scheduler`, `dataloader` and `train_state` entries on full saves. We
read only the model keys, so both full and model-only (last step) saves load.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan.distributed import ParallelDims

from .config_loader import ConfigError

STEP_DIR = re.compile(r"step-(\d+)$")


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N` folder as given, or the newest `step-N` inside a checkpoint folder."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r} is not a folder")
    if (path / ".metadata").is_file():
        return path
    steps = [(int(m.group(1)), p) for p in path.iterdir() if (m := STEP_DIR.search(p.name))]
    steps = [(n, p) for n, p in steps if (p / ".metadata").is_file()]
    if not steps:
        raise ConfigError(
            f"{path} holds no DCP checkpoint: expected a step-N folder with a .metadata "
            "file, or a folder of them (e.g. <dump_folder>/checkpoint)"
        )
    return max(steps)[1]


def single_process_parallel_dims() -> ParallelDims:
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def load_model(job_config, checkpoint: str | Path | None, device: torch.device):
    """(model in eval mode, family) of the job's model (denoiser or end-to-end twin,
    as `[diffusion_blocks] enable` says), weights from `checkpoint` when given."""
    from .train import build_model  # late: train imports the whole torchtitan stack

    job_config = copy.deepcopy(job_config)
    job_config.activation_checkpoint.mode = "none"
    job_config.compile.enable = False
    model, _, _, family = build_model(job_config, device, single_process_parallel_dims())
    if checkpoint is not None:
        load_model_weights(model, resolve_checkpoint(checkpoint))
    model.eval()
    return model, family


def load_model_weights(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    state = model.state_dict()
    stored = set(dcp.FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata)
    missing = sorted(set(state) - stored)
    if missing:
        raise ConfigError(
            f"checkpoint {checkpoint_dir} lacks {len(missing)} of this model's weights "
            f"(e.g. {missing[:3]}): was it saved by another [model] name / flavor or "
            "with another [diffusion_blocks] enable?"
        )
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(checkpoint_dir))
    model.load_state_dict(state)
