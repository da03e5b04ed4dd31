"""What a model family provides: its block-partitioned train spec, the end-to-end
twin's model class, its task and, for text families, the sampler tools/generate.py
calls. Each family builds one `ModelFamily` in its folder's `__init__.py`
(models/<family>/); registry.py registers them with torchtitan."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable

from torch import nn

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.protocols.train_spec import TrainSpec

from ..components.metrics import build_blockwise_metrics_processor
from .task import Task


@dataclass(frozen=True)
class TextRequest:
    """What tools/generate.py asks a text family for. None = the family's default."""

    prompt: str = ""
    max_new_tokens: int = 64
    num_samples: int = 1
    temperature: float | None = None  # autoregressive denoiser: 0 (greedy); MD4: 1
    top_k: int = 0                    # 0 = the whole vocabulary
    seed: int = 0
    steps_per_block: int | None = None
    """Autoregressive denoiser: Euler steps per block and new token
    (default [diffusion_blocks] sampling_steps_per_block)."""
    steps: int | None = None
    """Masked diffusion: ancestral steps in all (default [diffusion_blocks] sampling_steps)."""
    sampler: str | None = None
    """Autoregressive denoisers: the token sampler ('ancestral', 'euler' or 'heun'; None: the
    default, `models.llama3.sampler.DEFAULT_SAMPLER`)."""
    churn: float = 0.0
    """Autoregressive denoiser: EDM's S_churn (0 = none)."""
    start_sigma: float | None = None
    """Autoregressive denoisers: the sigma sampling starts from (None: the configured
    `[diffusion_blocks] sampling_sigma_max`, else sigma_max)."""
    stop_sigma: float | None = None
    """dblocks_llama3: the sigma the chain stops at, the token drawn from the logits
    there (None: sigma_min, the whole chain; `models.llama3.sampler.decoding_plan`)."""
    kv_cache: bool = True
    """dblocks_llama3 (block-wise and end to end): decode with the KV cache
    (`models/llama3/kv_cache.py`); False = recompute the context for every token."""

    # the flag that sets a field, where it is not --field-name
    FLAGS = {"kv_cache": "--no-kv-cache"}

    def refuse_options(self, names: tuple[str, ...], family: str) -> None:
        """ValueError naming the first of `names` (fields a family does not use) that
        the request sets: a flag we take must act or be refused."""
        defaults = {f.name: f.default for f in fields(self)}
        for name in names:
            if getattr(self, name) != defaults[name]:
                flag = self.FLAGS.get(name, f"--{name.replace('_', '-')}")
                raise ValueError(f"{flag} does not apply to {family} text generation")


# (model, tokenizer, job_config, request) -> one text per sample, prompt included
TextSampler = Callable[[Any, Any, Any, TextRequest], list[str]]


def edm_noise_levels(section):
    """EDM's sigma, its truncated log-normal law from `[diffusion_blocks]`."""
    return section.noise_schedule()


# The `[diffusion_blocks]` keys each family reads (`ModelFamily.reads`), in groups.
# Where a key is really read: docs/config.md names it per key; tests/test_keys.py walks
# every family x key.
# the block-wise trainer's own keys (train.py, parallel/): every family
TRAINER_KEYS = (
    "enable", "seed", "block_schedule", "block_weights", "offload_inactive_blocks",
    "block_parallel", "on_nonfinite", "max_nonfinite_skips",
)
# how the layers are cut into blocks and the noise range into intervals
PARTITION_KEYS = ("num_blocks", "layers_per_block", "partition", "overlap")
# EDM's sigma process (everything but MD4, whose noise is the masking time t)
EDM_KEYS = ("sigma_min", "sigma_max", "p_mean", "p_std", "sigma_data", "sigma_boundaries")
# the EDM denoisers' block-0 training law (BlockPartition.sample_training_levels)
BLOCK0_KEYS = ("block0_sigma_sampling",)
# the token-embedding denoisers (dblocks_llama3, dblocks_recurrent): DenoiserOptions
LM_DENOISER_KEYS = (
    "sampling_sigma_max", "target_embedding_scale", "token_embedding_init_std",
    "embedding_lr_multiplier", "sampling_steps_per_block", "adaln_cond_dim",
)
# only dblocks_llama3 (the autoregressive denoiser and its end-to-end twin)
HEAD_LOSS_KEYS = ("head_loss", "head_loss_chunk_rows")
# only the masked-diffusion LM
MASKING_KEYS = ("masking_schedule", "time_conditioning")
# the image sampler (DiT) and its training-time label dropout
DIT_KEYS = ("sampling_steps", "sampler", "cfg_scale", "label_dropout")
# the ViT's label sampler
VIT_KEYS = ("sampling_steps_per_block", "sampler")
# the keys the end-to-end trainer itself reads (train.py), whatever the family
END_TO_END_TRAINER_KEYS = ("enable", "seed", "on_nonfinite", "max_nonfinite_skips")


@dataclass(frozen=True)
class ModelFamily:
    name: str                       # the train spec's name, `[model] name`
    build_train_spec: Callable[[], TrainSpec]
    end_to_end_model_cls: type      # the same architecture without DiffusionBlocks
    task: Task
    stock_models: tuple[str, ...] = ()
    """Stock torchtitan train specs that `[model] converters = ["diffusion_blocks"]`
    turns into this family's denoiser."""
    added_by_conversion: Callable[[str], bool] | None = None
    """Model keys a stock checkpoint lacks (the modules the conversion adds): a model-only
    initial load leaves them as initialised (components/checkpoint.py); None: none."""
    check_config: Callable[[Any], None] | None = None
    """Family-specific checks of a job config, run before anything is built (raises
    ConfigError)."""
    embedding_parameters: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None
    """The parameters `[diffusion_blocks] embedding_lr_multiplier` acts on (None: the
    family has no such option)."""
    noise_levels: Callable[[Any], Any] = edm_noise_levels
    """`[diffusion_blocks]` section -> the noise process the family's blocks partition
    (a protocols.noise.NoiseLevels): EDM's sigma by default, MD4's masking time t."""
    sample_text: TextSampler | None = None
    """Text generation with the trained model (block-wise or its end-to-end twin);
    None for families that do not generate text."""
    reads: tuple[str, ...] = ()
    """The `[diffusion_blocks]` keys the block-wise family reads (an allow-list):
    registry.check_keys refuses any other key set to a value other than its default,
    so no setting is silently ignored."""
    twin_reads: tuple[str, ...] = END_TO_END_TRAINER_KEYS
    """The keys the end-to-end twin (`enable = false`) reads. The twin accepts the
    block-wise keys too (the run stays one flag away from its DiffusionBlocks twin) and
    logs the set ones it ignores; a key neither reads is refused."""
    identity_keys: tuple[str, ...] = ()
    """The keys that shape the trained function (its run identity,
    components/run_identity.py), checked wherever a checkpoint is loaded. The
    end-to-end twin's identity is the ones of them it reads (twin_reads)."""




def blockwise_train_spec(
    model_cls, flavors, parallelize_fn, build_dataloader_fn, build_tokenizer_fn,
    build_loss_fn, build_validator_fn, state_dict_adapter=None,
) -> TrainSpec:
    """torchtitan's optimizer and LR-scheduler builders, our metrics processor; no
    pipelining (one block a step)."""
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
