"""Shared helpers of the vision tests: building models from configs, recording which
layers each root forward call runs."""

import copy

import torch

from conftest import REPO
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.inference import load_model
from diffusion_blocks.registry import resolve_run_spec


def job_config(config: str, *overrides: str):
    return parse_job_config(["--job.config_file", str(REPO / "train_configs" / config), *overrides])


def build_on_cpu(config: str, *overrides: str, seed: int = 0):
    """The config's model (denoiser or twin) through inference.build_model, as the
    trainer builds it (one process, no activation checkpointing), freshly initialised."""
    torch.manual_seed(seed)
    cfg = job_config(config, *overrides)
    model, _ = load_model(cfg, None, torch.device("cpu"))
    return model, cfg


def build_on_meta(cfg):
    """The config's model class (denoiser or twin, as the run spec resolves it) on the
    meta device, as the trainer builds it."""
    spec = resolve_run_spec(cfg).spec
    args = copy.deepcopy(spec.model_args[cfg.model.flavor])
    args.update_from_config(cfg)
    with torch.device("meta"):
        return spec.model_cls(args)


class LayerCallRecorder:
    """Per root forward call, the layer ids that ran (in order)."""

    def __init__(self, model):
        self.calls: list[list[int]] = []
        self.handles = [model.register_forward_pre_hook(lambda *_: self.calls.append([]))]
        for layer_id, layer in model.layers.items():
            self.handles.append(layer.register_forward_hook(self._record(int(layer_id))))

    def _record(self, layer_id):
        def hook(*_):
            self.calls[-1].append(layer_id)

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()
