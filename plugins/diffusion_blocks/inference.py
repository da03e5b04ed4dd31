"""Building the model a job config trains, and loading a trained one for inference
(generation, classification, sampling).

`build_model` builds it outside the trainer (inference, memory estimates, tests) exactly
as torchtitan's Trainer builds it: the resolved train spec's model class on meta, model
converters, parallelisation, materialisation, init. `load_for_inference` builds it for
one process (no parallelism, no activation checkpointing or compile) and loads the
model weights from a torchtitan checkpoint.

torchtitan's CheckpointManager writes a DCP checkpoint whose top-level keys are the
model's parameter names (it flattens the model state into the top level), next to
`optimizer`, `lr_scheduler`, `dataloader` and `train_state` entries on full saves. Only
the model keys are read, so both full and model-only (last step) saves load. A
checkpoint saved with a run identity (components/run_identity.py) must match the config's: another
model, partition, noise setting or `[diffusion_blocks] enable` is refused with one line
naming the key and both values (the weights would load and produce garbage).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.logging import logger

from .components.checkpoint import rejected_listing, newest_usable_step_folder
from .components.run_identity import check_identity, run_identity
from .components.subnormals import flush_subnormals
from .errors import ConfigError
from .registry import resolve_run_spec


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP step folder (has .metadata), or a checkpoint folder: its newest usable
    step-N, skipping broken newer ones with a log line as a resume does
    (components.checkpoint.newest_usable_step_folder)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"--checkpoint {path}: no such folder")
    folder, rejected = newest_usable_step_folder(path)
    if folder is None:
        reasons = f" (none usable: {rejected_listing(rejected)})" if rejected else ""
        raise ConfigError(
            f"--checkpoint {path}: no DCP checkpoint there (expected a step-N folder "
            f"with a .metadata file, or a folder containing step-N folders){reasons}"
        )
    if rejected:
        logger.warning(f"Using {folder}, the newest usable checkpoint (skipped: {rejected_listing(rejected)})")
    return folder


def single_process_parallel_dims() -> ParallelDims:
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def build_model(
    job_config, device: torch.device, parallel_dims: ParallelDims, parallelize=None,
    adjust_model_args=None,
):
    """Returns (model, model_args, run_spec). `parallelize(model)` replaces the spec's
    parallelize_fn when given; `adjust_model_args(model_args)` changes the flavor's
    arguments (after the config's) before the model is built (the memory estimator's
    attention kernel)."""
    run = resolve_run_spec(job_config)
    model_args = copy.deepcopy(run.spec.model_args[job_config.model.flavor])
    model_args.update_from_config(job_config)
    if adjust_model_args is not None:
        adjust_model_args(model_args)
    with torch.device("meta"), titan_utils.set_default_dtype(
        TORCH_DTYPE_MAP[job_config.training.dtype]
    ):
        model = run.spec.model_cls(model_args)
    build_model_converters(job_config, parallel_dims).convert(model)
    if parallelize is None:
        model = run.spec.parallelize_fn(model, parallel_dims, job_config)
    else:
        model = parallelize(model)
    model.to_empty(device=device)
    flush_subnormals(torch.device(device).type)  # sampler chains reach near one-hot softmaxes too
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, model_args, run


def build_for_inference(job_config, device: torch.device):
    """(model, spec, family): the configured model (denoiser or end-to-end twin, as
    `[diffusion_blocks] enable` says), freshly initialised, in eval mode."""
    job_config = copy.deepcopy(job_config)
    job_config.compile.enable = False
    job_config.activation_checkpoint.mode = "none"
    model, _, run = build_model(job_config, device, single_process_parallel_dims())
    return model.eval(), run.spec, run.family


def check_checkpoint_fits(job_config, model, step_folder: Path, family) -> None:
    """ConfigError unless the checkpoint's saved identity (if any) is the config's."""
    partition = model.partition if job_config.diffusion_blocks.enable else None
    check_identity(
        step_folder, run_identity(job_config, partition, family),
        "Use the config (and --section.key overrides) the checkpoint was trained with",
    )


def load_model_weights(model: torch.nn.Module, step_folder: Path) -> None:
    state = model.state_dict()
    stored = set(dcp.FileSystemReader(str(step_folder)).read_metadata().state_dict_metadata)
    missing = sorted(set(state) - stored)
    if missing:
        raise ConfigError(
            f"checkpoint {step_folder} lacks {len(missing)} of this model's weights "
            f"(e.g. {missing[:3]}): was it saved by another [model] name / flavor or "
            "with another [diffusion_blocks] enable?"
        )
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step_folder))
    model.load_state_dict(state)


def load_model(job_config, checkpoint: str | Path | None, device: torch.device):
    """(model in eval mode, family); weights from `checkpoint` when given."""
    model, _, family = build_for_inference(job_config, device)
    if checkpoint is not None:
        step_folder = resolve_checkpoint(checkpoint)
        check_checkpoint_fits(job_config, model, step_folder, family)
        load_model_weights(model, step_folder)
    return model, family


def load_for_inference(job_config, checkpoint: str | Path, device: str = "cpu"):
    """Build the configured model and load its weights. Returns (model, tokenizer, step_folder)."""
    model, spec, family = build_for_inference(job_config, torch.device(device))
    step_folder = resolve_checkpoint(checkpoint)
    check_checkpoint_fits(job_config, model, step_folder, family)
    load_model_weights(model, step_folder)
    tokenizer = spec.build_tokenizer_fn(job_config) if spec.build_tokenizer_fn else None
    return model, tokenizer, step_folder


def expect_model(job_config, name: str, tool: str) -> None:
    """A tool made for one train spec refuses a config of another, naming both."""
    if job_config.model.name != name:
        raise ConfigError(
            f"{tool} works on {name} models; the config's [model] name is "
            f"{job_config.model.name!r}"
        )
