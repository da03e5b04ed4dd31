"""The model a job config trains, built outside the trainer (inference, memory
estimates, tests) exactly as torchtitan's Trainer builds it: the resolved train spec's
model class on meta, model converters, parallelisation, materialisation, init."""

from __future__ import annotations

import copy

import torch

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.tools import utils as titan_utils

from .registry import resolve_run_spec


def build_model(job_config, device: torch.device, parallel_dims: ParallelDims, parallelize=None):
    """Returns (model, model_args, run_spec). `parallelize(model)` replaces the spec's
    parallelize_fn when given."""
    run = resolve_run_spec(job_config)
    model_args = copy.deepcopy(run.spec.model_args[job_config.model.flavor])
    model_args.update_from_config(job_config)
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
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model, model_args, run
