"""What a model family provides: its block-partitioned train spec, the end-to-end
twin's model class and its task. Each family builds one `ModelFamily` in its folder's
`__init__.py` (models/<family>/); registry.py registers them with torchtitan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from torch import nn

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.protocols.train_spec import TrainSpec

from .metrics import build_blockwise_metrics_processor
from .tasks import Task


@dataclass(frozen=True)
class ModelFamily:
    name: str                       # the train spec's name, `[model] name`
    build_train_spec: Callable[[], TrainSpec]
    end_to_end_model_cls: type      # the same architecture without DiffusionBlocks
    task: Task
    stock_models: tuple[str, ...] = ()
    """Stock torchtitan train specs that `[model] converters = ["diffusion_blocks"]`
    turns into this family's denoiser."""
    check_config: Callable[[Any], None] | None = None
    """Family-specific checks of a job config, run before anything is built (raises
    ConfigError)."""
    generate_text: Callable | None = None
    """`generate_text(model, prompt_BT, DecodingConfig, max_context) -> tokens_BT` for
    the denoiser and its twin (tools/generate.py); None for families without text."""
    embedding_parameters: Callable[[nn.Module], Iterable[nn.Parameter]] | None = None
    """The parameters `[diffusion_blocks] embedding_lr_multiplier` acts on (None: the
    family has no such option)."""


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
