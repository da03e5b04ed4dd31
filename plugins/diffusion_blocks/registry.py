"""Registration with torchtitan's registries (the families' train specs, the model
converter, datasets), and which spec, model family and model class a job config trains.

`import diffusion_blocks` calls `register_all()` once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

from torchtitan.components.tokenizer import build_hf_tokenizer
from torchtitan.protocols.model_converter import (
    _registry_model_converter_cls,
    register_model_converter,
)
from torchtitan.tools.logging import logger
from torchtitan.protocols.train_spec import (
    _extra_train_specs,
    get_train_spec,
    register_train_spec,
    TrainSpec,
)

from .components.optimizer import with_embedding_lr
from .config.sections import DiffusionBlocks
from .data.text import build_hf_tokenizer_checked, build_tokenizer, register_text_datasets
from .diffusion.partition import BlockPartition
from .errors import ConfigError, origin_of
from .models import dit, llama3, md4, recurrent, vit
from .models.llama3.converter import CONVERTER_NAME, DiffusionBlocksConverter
from .protocols.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (llama3.FAMILY, vit.FAMILY, dit.FAMILY, md4.FAMILY, recurrent.FAMILY)
}

# stock torchtitan train specs that `[model] converters = ["diffusion_blocks"]` turns
# into a DiffusionBlocks family's denoiser
STOCK_MODELS: dict[str, str] = {
    stock: family.name for family in FAMILIES.values() for stock in family.stock_models
}


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
    check_keys(family, job_config)
    if family.check_config is not None:
        family.check_config(job_config)
    if job_config.model.flavor not in spec.model_args:
        raise ConfigError(
            f"{origin_of(job_config, 'model', 'flavor')}: [model] flavor = "
            f"{job_config.model.flavor!r} is not a flavor of {name}; "
            f"available: {sorted(spec.model_args)}"
        )
    if enabled:  # a partition that does not fit the model fails here, before any work
        BlockPartition.from_job_config(
            job_config, spec.model_args[job_config.model.flavor].n_layers,
            family.noise_levels(job_config.diffusion_blocks),
        )
        spec = with_embedding_lr_multiplier(spec, family, job_config)
    else:
        spec = dataclasses.replace(spec, model_cls=family.end_to_end_model_cls)
    return RunSpec(spec, family, enabled)


def set_keys(job_config) -> list[str]:
    """The `[diffusion_blocks]` keys set to a value other than their default."""
    section, defaults = job_config.diffusion_blocks, DiffusionBlocks()
    return [
        f.name for f in dataclasses.fields(DiffusionBlocks)
        if getattr(section, f.name) != getattr(defaults, f.name)
    ]


def check_keys(family: ModelFamily, job_config) -> None:
    """Every `[diffusion_blocks]` key set is read: a key outside the family's `reads`
    (block-wise) is refused; the end-to-end twin also accepts its block-wise keys
    (one flag away) and logs, in one line, the set ones it ignores."""
    enabled = job_config.diffusion_blocks.enable
    accepted = family.reads if enabled else (*family.reads, *family.twin_reads)
    for key in set_keys(job_config):
        if key not in accepted:
            refuse_key(family, job_config, key)
    if not enabled:
        ignored = [k for k in set_keys(job_config) if k not in family.twin_reads]
        if ignored:
            logger.info(
                f"[diffusion_blocks] enable = false: the end-to-end {family.name} ignores "
                f"{', '.join(ignored)} (read by its block-wise run only)"
            )


def refuse_key(family: ModelFamily, job_config, key: str) -> None:
    value, default = getattr(job_config.diffusion_blocks, key), getattr(DiffusionBlocks(), key)
    twin = "" if job_config.diffusion_blocks.enable else " (block-wise or end to end)"
    raise ConfigError(
        f"{origin_of(job_config, 'diffusion_blocks', key)}: [diffusion_blocks] {key} "
        f"= {value!r} is not read by {family.name}{twin}; remove it (default: {default!r})"
    )


def with_embedding_lr_multiplier(spec: TrainSpec, family: ModelFamily, job_config) -> TrainSpec:
    """The spec with `[diffusion_blocks] embedding_lr_multiplier` applied to its
    optimizer builder (unchanged at 1.0)."""
    multiplier = job_config.diffusion_blocks.embedding_lr_multiplier
    if multiplier == 1.0:
        return spec
    if family.embedding_parameters is None:
        raise ConfigError(
            f"{origin_of(job_config, 'diffusion_blocks', 'embedding_lr_multiplier')}: "
            f"[diffusion_blocks] embedding_lr_multiplier is not supported by {family.name} "
            "(it has no embedding parameters to single out); leave it at 1.0"
        )
    build = with_embedding_lr(spec.build_optimizers_fn, family.embedding_parameters, multiplier)
    return dataclasses.replace(spec, build_optimizers_fn=build)


def register_all() -> None:
    for name, family in FAMILIES.items():
        if name not in _extra_train_specs:
            register_train_spec(name, family.build_train_spec())
    if CONVERTER_NAME not in _registry_model_converter_cls:
        register_model_converter(DiffusionBlocksConverter, CONVERTER_NAME)
    register_text_datasets()
