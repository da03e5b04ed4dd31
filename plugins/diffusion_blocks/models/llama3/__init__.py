"""Autoregressive Llama denoiser (`dblocks_llama3`) on torchtitan's llama3 layers; a
stock `llama3` with `[model] converters = ["diffusion_blocks"]` trains the same way."""

from functools import partial

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_denoiser_validator
from ...data.text import build_tokenizer
from ...parallel.parallelize import parallelize_dblocks_llama
from ...protocols.family import (
    BLOCK0_KEYS,
    blockwise_train_spec,
    EDM_KEYS,
    END_TO_END_TRAINER_KEYS,
    HEAD_LOSS_KEYS,
    LM_DENOISER_KEYS,
    ModelFamily,
    PARTITION_KEYS,
    TRAINER_KEYS,
)
from .args import dblocks_llama3_flavors
from .model import DiffusionBlocksLlama, is_added_by_conversion
from .sampler import continue_prompt, generate
from .task import LanguageModelTask


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        DiffusionBlocksLlama, dblocks_llama3_flavors(), parallelize_dblocks_llama,
        build_text_dataloader, build_tokenizer, build_cross_entropy_loss,
        partial(build_denoiser_validator, LanguageModelTask()), Llama3StateDictAdapter,
    )


def token_embedding_parameters(model) -> list:
    return list(model.tok_embeddings.parameters())


FAMILY = ModelFamily(
    "dblocks_llama3", get_train_spec, Transformer, LanguageModelTask(), stock_models=("llama3",),
    added_by_conversion=is_added_by_conversion,
    embedding_parameters=token_embedding_parameters,
    sample_text=partial(continue_prompt, generate, "dblocks_llama3"),
    reads=(
        TRAINER_KEYS + PARTITION_KEYS + EDM_KEYS + BLOCK0_KEYS + LM_DENOISER_KEYS
        + ("sigma_per_token", "self_conditioning") + HEAD_LOSS_KEYS
    ),
    twin_reads=END_TO_END_TRAINER_KEYS + HEAD_LOSS_KEYS,
    identity_keys=(
        PARTITION_KEYS + EDM_KEYS
        + ("sigma_per_token", "target_embedding_scale", "adaln_cond_dim", "self_conditioning")
    ),
)
