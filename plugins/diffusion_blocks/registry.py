"""Registration with torchtitan's registries (train specs, model converters, datasets),
and which spec, model family and model class a job config trains.

`import diffusion_blocks` calls `register_all()` once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.model_converter import (
    _registry_model_converter_cls,
    register_model_converter,
)
from torchtitan.protocols.train_spec import (
    _extra_train_specs,
    get_train_spec,
    register_train_spec,
    TrainSpec,
)

from .config_loader import ConfigError, origin_of
from .converter import CONVERTER_NAME, DiffusionBlocksConverter
from .data.images import build_image_dataloader
from .data.text import build_hf_tokenizer_checked, build_tokenizer, register_text_datasets
from .metrics import build_blockwise_metrics_processor
from .models.dit import DiffusionBlocksDiT, dit_flavors, EndToEndDiT
from .models.llama import DiffusionBlocksLlama, dblocks_llama3_flavors
from .models.vit import DiffusionBlocksViT, PlainViT, vit_flavors
from .objectives import build_squared_error_loss
from .parallelize import parallelize_dblocks_llama, parallelize_vision
from .partition import BlockPartition
from .tasks import LanguageModelTask, Task
from .validation import build_denoiser_validator, build_task_validator
from .vision_tasks import ImageClassificationTask, ImageGenerationTask


def _blockwise_train_spec(
    model_cls, flavors, parallelize_fn, build_dataloader_fn, build_tokenizer_fn,
    build_loss_fn, build_validator_fn, state_dict_adapter=None,
) -> TrainSpec:
    """torchtitan's optimizer and LR-scheduler builders; no pipelining (one block a step)."""
    return TrainSpec(
        model_cls=model_cls,
        model_args=flavors,
        parallelize_fn=parallelize_fn,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader_fn,
        build_tokenizer_fn=build_tokenizer_fn,
        build_loss_fn=build_loss_fn,
        build_validator_fn=build_validator_fn,
        build_metrics_processor_fn=build_blockwise_metrics_processor,
        state_dict_adapter=state_dict_adapter,
    )


def dblocks_llama3_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksLlama, dblocks_llama3_flavors(), parallelize_dblocks_llama,
        build_text_dataloader, build_tokenizer, build_cross_entropy_loss,
        partial(build_denoiser_validator, LanguageModelTask()), Llama3StateDictAdapter,
    )


def dblocks_vit_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksViT, vit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_cross_entropy_loss,
        partial(build_task_validator, ImageClassificationTask().evaluate),
    )


def dblocks_dit_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksDiT, dit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_squared_error_loss,
        partial(build_task_validator, ImageGenerationTask().evaluate),
    )


@dataclass(frozen=True)
class ModelFamily:
    """A block-partitioned train spec and what the train loop needs beside it."""

    build_train_spec: Callable[[], TrainSpec]
    end_to_end_model_cls: type      # the same architecture without DiffusionBlocks
    task: Task


FAMILIES: dict[str, ModelFamily] = {
    "dblocks_llama3": ModelFamily(dblocks_llama3_train_spec, Transformer, LanguageModelTask()),
    "dblocks_vit": ModelFamily(dblocks_vit_train_spec, PlainViT, ImageClassificationTask()),
    "dblocks_dit": ModelFamily(dblocks_dit_train_spec, EndToEndDiT, ImageGenerationTask()),
}

# stock torchtitan train specs that `[model] converters = ["diffusion_blocks"]` turns
# into a DiffusionBlocks family's denoiser
STOCK_MODELS: dict[str, str] = {"llama3": "dblocks_llama3"}


@dataclass(frozen=True)
class RunSpec:
    """What one job config trains: the train spec torchtitan's Trainer is given (the
    model class is the end-to-end twin's when `[diffusion_blocks] enable = false`),
    the family and whether the run is block-wise."""

    spec: TrainSpec
    family: ModelFamily
    enabled: bool


def check_converters(job_config) -> None:
    unknown = [c for c in job_config.model.converters if c not in _registry_model_converter_cls]
    if unknown:
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'converters')}: [model] converters "
            f"{unknown} are not registered model converters; available: "
            f"{sorted(_registry_model_converter_cls)}"
        )


def resolve_run_spec(job_config) -> RunSpec:
    check_converters(job_config)
    name = job_config.model.name
    enabled = job_config.diffusion_blocks.enable
    converted = CONVERTER_NAME in job_config.model.converters
    if name in FAMILIES:
        family, spec = FAMILIES[name], get_train_spec(name)
    elif name in STOCK_MODELS and converted:
        family = FAMILIES[STOCK_MODELS[name]]
        stock, ours = get_train_spec(name), get_train_spec(STOCK_MODELS[name])
        # the stock model, flavors, data, tokenizer and checkpoint adapter; the
        # block-wise parallelisation, validation and metrics
        stock_tokenizer = stock.build_tokenizer_fn
        if stock_tokenizer is build_hf_tokenizer:
            stock_tokenizer = build_hf_tokenizer_checked
        spec = dataclasses.replace(
            stock,
            parallelize_fn=ours.parallelize_fn,
            pipelining_fn=None,
            build_loss_fn=ours.build_loss_fn,
            build_validator_fn=ours.build_validator_fn,
            build_metrics_processor_fn=ours.build_metrics_processor_fn,
            build_tokenizer_fn=partial(build_tokenizer, default=stock_tokenizer),
        )
    else:
        stock_hint = (
            f"; stock {sorted(STOCK_MODELS)} models train block-wise with [model] "
            f"converters = [\"{CONVERTER_NAME}\"]"
        )
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'name')}: [model] name = {name!r} is not a "
            f"DiffusionBlocks model; available: {sorted(FAMILIES)}{stock_hint}"
        )
    if job_config.model.flavor not in spec.model_args:
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'flavor')}: [model] flavor = "
            f"{job_config.model.flavor!r} is not a flavor of {name}; "
            f"available: {sorted(spec.model_args)}"
        )
    if enabled:  # a partition that does not fit the model fails here, before any work
        BlockPartition.from_job_config(job_config, spec.model_args[job_config.model.flavor].n_layers)
    else:
        spec = dataclasses.replace(spec, model_cls=family.end_to_end_model_cls)
    return RunSpec(spec, family, enabled)


def register_all() -> None:
    for name, family in FAMILIES.items():
        if name not in _extra_train_specs:
            register_train_spec(name, family.build_train_spec())
    if CONVERTER_NAME not in _registry_model_converter_cls:
        register_model_converter(DiffusionBlocksConverter, CONVERTER_NAME)
    register_text_datasets()
