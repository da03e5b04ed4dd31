"""Masked-diffusion LM (`dblocks_md4`, MD4: Shi et al. 2024) on torchtitan's llama3
layers: bidirectional attention, a [MASK] token, the blocks partitioning the masking
time t; the end-to-end twin (`[diffusion_blocks] enable = false`) is MD4 itself."""

from functools import partial

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_task_validator
from ...errors import ConfigError, origin_of
from ...parallel.parallelize import parallelize_dblocks_llama
from ...protocols.family import (
    blockwise_train_spec,
    END_TO_END_TRAINER_KEYS,
    MASKING_KEYS,
    ModelFamily,
    PARTITION_KEYS,
    TRAINER_KEYS,
)
from ..llama3.model import is_added_by_conversion
from .args import masking_noise_levels, md4_flavors
from .model import EndToEndMaskedDiffusionLM, MaskedDiffusionLM
from .sampler import sample_text
from .task import build_md4_tokenizer, MaskedDiffusionTask


def build_md4_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs):
    """torchtitan's text dataloader, once the tokenizer's ids are known to fit the
    flavor's vocabulary below [MASK]."""
    data_vocab = md4_flavors()[job_config.model.flavor].data_vocab_size
    if tokenizer.get_vocab_size() > data_vocab:
        raise ConfigError(
            f"{origin_of(job_config, 'data', 'tokenizer')}: the tokenizer has "
            f"{tokenizer.get_vocab_size()} ids but [model] flavor = "
            f"{job_config.model.flavor!r} predicts {data_vocab} (+ [MASK]); use a flavor "
            f"with a larger vocab_size or [data] tokenizer = 'char'"
        )
    return build_text_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        MaskedDiffusionLM, md4_flavors(), parallelize_dblocks_llama,
        build_md4_dataloader, build_md4_tokenizer, build_cross_entropy_loss,
        partial(build_task_validator, MaskedDiffusionTask().evaluate),
    )


FAMILY = ModelFamily(
    "dblocks_md4", get_train_spec, EndToEndMaskedDiffusionLM, MaskedDiffusionTask(),
    added_by_conversion=is_added_by_conversion,
    noise_levels=masking_noise_levels, sample_text=sample_text,
    # sigma_boundaries: partition = 'explicit' in t (the masking process's level)
    reads=TRAINER_KEYS + PARTITION_KEYS + ("sigma_boundaries",) + MASKING_KEYS + ("adaln_cond_dim", "sampling_steps"),
    twin_reads=END_TO_END_TRAINER_KEYS + MASKING_KEYS + ("adaln_cond_dim", "sampling_steps"),
    identity_keys=PARTITION_KEYS + ("sigma_boundaries",) + MASKING_KEYS + ("adaln_cond_dim",),
)
