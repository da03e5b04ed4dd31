"""Registration with torchtitan's registries (train specs, model converters, datasets).

`import diffusion_blocks` calls `register_all()` once."""

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.model_converter import (
    _registry_model_converter_cls,
    register_model_converter,
)
from torchtitan.protocols.train_spec import _extra_train_specs, register_train_spec, TrainSpec

from dataclasses import dataclass
from typing import Callable

from torchtitan.models.llama3 import Transformer

from .converter import DiffusionBlocksConverter
from .data.images import build_image_dataloader
from .data.text import build_tokenizer, register_text_datasets
from .models.dit import DiffusionBlocksDiT, dit_flavors, EndToEndDiT
from .models.llama import DiffusionBlocksLlama, dblocks_llama3_flavors
from .models.vit import DiffusionBlocksViT, PlainViT, vit_flavors
from .objectives import build_weighted_cross_entropy, build_weighted_squared_error
from .parallelize import parallelize_dblocks_llama, parallelize_vision
from .tasks import LanguageModelTask, Task
from .vision_tasks import ImageClassificationTask, ImageGenerationTask

CONVERTER_NAME = "diffusion_blocks"


def _blockwise_train_spec(
    model_cls, flavors, parallelize_fn, build_dataloader_fn, build_tokenizer_fn, build_loss_fn
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
    )


def dblocks_llama3_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksLlama, dblocks_llama3_flavors(), parallelize_dblocks_llama,
        build_text_dataloader, build_tokenizer, build_weighted_cross_entropy,
    )


def dblocks_vit_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksViT, vit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_weighted_cross_entropy,
    )


def dblocks_dit_train_spec() -> TrainSpec:
    return _blockwise_train_spec(
        DiffusionBlocksDiT, dit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_weighted_squared_error,
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


def model_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(
            f"[model] name = {name!r} is not a DiffusionBlocks model; "
            f"available: {sorted(FAMILIES)}"
        )
    return FAMILIES[name]


def register_all() -> None:
    for name, family in FAMILIES.items():
        if name not in _extra_train_specs:
            register_train_spec(name, family.build_train_spec())
    if CONVERTER_NAME not in _registry_model_converter_cls:
        register_model_converter(DiffusionBlocksConverter, CONVERTER_NAME)
    register_text_datasets()
