"""`[diffusion_blocks] head_loss = "chunked"`: the LM's output projection computes the
labels' cross-entropy itself, without the full-vocabulary logits kept for backward.

`CrossEntropyHead` is the model's `output` nn.Linear, class-swapped (same weight, same
state-dict key): called on h it returns logits, as before; inside
`scoring_labels(model, labels)` it returns each label's CE (float32, shape of labels)
from `linear_ce.linear_cross_entropy` instead. The CE runs inside the head's own
forward because that is where FSDP2 has the head's weight gathered (and registers its
gradient reduction); outside, the weight is a sharded DTensor. So neither the
denoiser's forward nor the end-to-end twin's (torchtitan's own Transformer.forward,
which returns whatever `self.output` returns) changes.
"""

from contextlib import contextmanager

import torch
from torch import nn

from ..components.linear_ce import linear_cross_entropy


class CrossEntropyHead(nn.Linear):
    chunk_rows: int
    labels: torch.Tensor | None = None  # set only inside scoring_labels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return super().forward(h)
        if self.bias is not None:
            raise ValueError("CrossEntropyHead computes the CE of a head without bias")
        if h.shape[:-1] != self.labels.shape:
            raise ValueError(
                f"head input {tuple(h.shape)} does not match labels {tuple(self.labels.shape)}"
            )
        ce_N = linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), self.weight, self.labels.reshape(-1), self.chunk_rows
        )
        return ce_N.view(self.labels.shape)


def use_cross_entropy_head(model: nn.Module, chunk_rows: int) -> None:
    """Make `model.output` a CrossEntropyHead, in place (before FSDP wraps it)."""
    head = model.output
    if not isinstance(head, nn.Linear):
        raise ValueError(f"head_loss = 'chunked' needs an nn.Linear head, got {type(head).__name__}")
    if not isinstance(head, CrossEntropyHead):
        head.__class__ = CrossEntropyHead
    head.chunk_rows = chunk_rows


def apply_head_loss(model: nn.Module, section) -> None:
    """`[diffusion_blocks] head_loss` on a built LM (the denoiser or its twin): 'dense'
    leaves the plain head."""
    if section.head_loss == "chunked":
        use_cross_entropy_head(model, section.head_loss_chunk_rows)


def scores_labels_in_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "output", None), CrossEntropyHead)


@contextmanager
def scoring_labels(model: nn.Module, labels: torch.Tensor):
    """Within: the model's CrossEntropyHead returns each label's CE instead of logits."""
    head = model.output
    head.labels = labels
    try:
        yield
    finally:
        head.labels = None
