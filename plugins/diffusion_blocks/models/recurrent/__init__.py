"""Recurrent-depth (looped) LM (`dblocks_recurrent`): a prelude, one shared core applied
r times, a coda. DiffusionBlocks trains the core as one denoiser in a single pass at a
random sigma; the end-to-end twin is Huginn's recipe (random r, truncated BPTT)."""

from functools import partial

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_denoiser_validator
from ...data.text import build_tokenizer
from ...errors import ConfigError, origin_of
from ...parallel.parallelize import parallelize_dblocks_llama
from ...protocols.family import (
    BLOCK0_KEYS,
    blockwise_train_spec,
    EDM_KEYS,
    END_TO_END_TRAINER_KEYS,
    LM_DENOISER_KEYS,
    ModelFamily,
    TRAINER_KEYS,
)
from ..llama3 import token_embedding_parameters
from ..llama3.model import is_added_by_conversion
from ..llama3.sampler import continue_prompt
from ..llama3.task import LanguageModelTask
from .args import recurrent_flavors
from .model import RecurrentDenoiser, RecurrentTwin
from .sampler import generate

NAME = "dblocks_recurrent"


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        RecurrentDenoiser, recurrent_flavors(), parallelize_dblocks_llama,
        build_text_dataloader, build_tokenizer, build_cross_entropy_loss,
        partial(build_denoiser_validator, LanguageModelTask()),
    )


def check_config(job_config) -> None:
    """One block: the shared core is one denoiser over all of [sigma_min, sigma_max];
    how many times it runs (r) is chosen at inference, not by a partition."""
    section = job_config.diffusion_blocks
    if not section.enable:
        return
    for key, value, ok in (
        ("num_blocks", section.num_blocks, section.num_blocks == 1),
        ("layers_per_block", section.layers_per_block, len(section.layers_per_block) <= 1),
        ("block_parallel", section.block_parallel, not section.block_parallel),
    ):
        if not ok:
            raise ConfigError(
                f"{origin_of(job_config, 'diffusion_blocks', key)}: [diffusion_blocks] {key} "
                f"= {value}: {NAME} trains ONE shared core over all of [sigma_min, "
                "sigma_max] (a single block; r is chosen at inference with "
                "sampling_steps_per_block); set num_blocks = 1, no layers_per_block, "
                "block_parallel = false"
            )


FAMILY = ModelFamily(
    NAME, get_train_spec, RecurrentTwin, LanguageModelTask(),
    added_by_conversion=is_added_by_conversion,
    embedding_parameters=token_embedding_parameters, check_config=check_config,
    # its sampler recomputes the context for every token: no KV cache to turn off
    # its twin iterates the core r = steps_per_block times too (tools/generate.py --recurrence)
    sample_text=partial(continue_prompt, generate, NAME, refused=("steps", "kv_cache", "stop_sigma"),
                        twin_uses=("steps_per_block",)),
    # one block over all of [sigma_min, sigma_max]: no partition or overlap to read
    # (check_config keeps num_blocks, layers_per_block and block_parallel at one block)
    reads=TRAINER_KEYS + ("num_blocks", "layers_per_block") + EDM_KEYS + BLOCK0_KEYS + LM_DENOISER_KEYS,
    twin_reads=(
        END_TO_END_TRAINER_KEYS + EDM_KEYS
        + tuple(key for key in LM_DENOISER_KEYS if key != "embedding_lr_multiplier")
    ),
    identity_keys=EDM_KEYS + ("target_embedding_scale", "adaln_cond_dim"),
)
