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

from .converter import DiffusionBlocksConverter
from .data.text import build_tokenizer, register_text_datasets
from .models.llama import DiffusionBlocksLlama, dblocks_llama3_flavors
from .objectives import build_weighted_cross_entropy
from .parallelize import parallelize_dblocks_llama

CONVERTER_NAME = "diffusion_blocks"


def dblocks_llama3_train_spec() -> TrainSpec:
    return TrainSpec(
        model_cls=DiffusionBlocksLlama,
        model_args=dblocks_llama3_flavors(),
        parallelize_fn=parallelize_dblocks_llama,
        pipelining_fn=None,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_text_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_weighted_cross_entropy,
    )


TRAIN_SPECS = {"dblocks_llama3": dblocks_llama3_train_spec}


def register_all() -> None:
    for name, build_spec in TRAIN_SPECS.items():
        if name not in _extra_train_specs:
            register_train_spec(name, build_spec())
    if CONVERTER_NAME not in _registry_model_converter_cls:
        register_model_converter(DiffusionBlocksConverter, CONVERTER_NAME)
    register_text_datasets()
