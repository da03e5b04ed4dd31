"""A learning-rate multiplier for a family's embedding parameters
(`[diffusion_blocks] embedding_lr_multiplier`).

torchtitan builds the optimizers from the train spec's `build_optimizers_fn` (one param
group per model part); `with_embedding_lr` wraps it: the container it returns (and so
torchtitan's checkpointing and `state_dict` flattening per parameter name) is
unchanged, only each optimizer's param groups are split: the embedding parameters move
to a group of their own with lr x multiplier. torchtitan's LambdaLR scales every
group's own initial lr by the same factor, so the ratio holds at every step.
`param_groups[0]` stays the base group (the lr the trainer logs).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def split_param_groups(
    optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], lr_multiplier: float
) -> None:
    """Give `params` a param group of their own, with their group's settings and
    lr x lr_multiplier (before any step: no optimizer state moves)."""
    chosen_ids = {id(p) for p in params}
    for group in list(optimizer.param_groups):
        chosen = [p for p in group["params"] if id(p) in chosen_ids]
        if not chosen:
            continue
        if len(chosen) == len(group["params"]):  # e.g. one optimizer per parameter
            group["lr"] = group["lr"] * lr_multiplier
            continue
        group["params"] = [p for p in group["params"] if id(p) not in chosen_ids]
        settings = {k: v for k, v in group.items() if k != "params"}
        optimizer.add_param_group({**settings, "params": chosen, "lr": group["lr"] * lr_multiplier})


def with_embedding_lr(
    build_optimizers: Callable, embedding_parameters: Callable[[nn.Module], Iterable[nn.Parameter]],
    lr_multiplier: float,
) -> Callable:
    """A `build_optimizers_fn` that builds with `build_optimizers`, then gives the
    parameters `embedding_parameters(model_part)` returns lr x lr_multiplier."""

    def build(model_parts, optimizer_config, parallel_dims, ft_manager=None):
        container = build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
        embeddings = [p for part in model_parts for p in embedding_parameters(part)]
        for optimizer in container.optimizers:
            split_param_groups(optimizer, embeddings, lr_multiplier)
        return container

    return build
