"""The head's linear projection and its cross-entropy without keeping the
full-vocabulary logits for backward.

The dense path (`head(h)` then `F.cross_entropy`) saves the (N, V) log-softmax for
backward. `chunked_linear_cross_entropy` computes each label's CE chunk by chunk and
saves only h, the head weight and one logsumexp per row; backward recomputes each
chunk's logits. On CUDA, when Apple's cut-cross-entropy package is importable
(`pip install -e ".[fused-ce]"`), `linear_cross_entropy` uses its fused kernel instead
(CCE: no logits in global memory at all). Both return one CE per row, so the caller's
per-row weights (w(sigma)) reach backward through autograd as per-row gradients.
"""

from functools import cache

import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from ..diffusion.objectives import label_ce_sums, LossSums

DEFAULT_CHUNK_ROWS = 1024


def matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on for h's device
    (torchtitan's single-device mixed precision), else h's."""
    device_type = h.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h.dtype


def _chunk_logits(h_CD: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
    """float32 logits of one chunk, rounded as the dense head rounds them (matmul in
    the inputs' dtype, then float32 for the CE)."""
    return F.linear(h_CD, weight_VD).float()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """ce_N = CE(h_ND @ weight_VD^T, labels_N) per row (float32; 0 at IGNORE_INDEX),
    chunk_rows rows at a time. Saves h, weight, labels and the per-row logsumexp; the
    backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, labels_N, chunk_rows: int, compute_dtype: torch.dtype):
        h_cast, weight_cast = h_ND.to(compute_dtype), weight_VD.to(compute_dtype)
        ce_N = h_ND.new_empty(labels_N.shape, dtype=torch.float32)
        lse_N = torch.empty_like(ce_N)
        for start in range(0, labels_N.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits_CV = _chunk_logits(h_cast[rows], weight_cast)
            lse_C = torch.logsumexp(logits_CV, dim=-1)
            labels_C = labels_N[rows]
            valid_C = labels_C != IGNORE_INDEX
            label_logit_C = logits_CV.gather(1, labels_C.clamp_min(0)[:, None]).squeeze(1)
            ce_N[rows] = torch.where(valid_C, lse_C - label_logit_C, 0.0)
            lse_N[rows] = lse_C
        ctx.save_for_backward(h_ND, weight_VD, labels_N, lse_N)
        ctx.chunk_rows, ctx.compute_dtype = chunk_rows, compute_dtype
        return ce_N

    @staticmethod
    def backward(ctx, grad_ce_N):
        h_ND, weight_VD, labels_N, lse_N = ctx.saved_tensors
        dtype = ctx.compute_dtype
        h_cast, weight_cast = h_ND.to(dtype), weight_VD.to(dtype)
        grad_h_ND = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_weight_VD = (
            torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device)
            if ctx.needs_input_grad[1] else None
        )
        for start in range(0, labels_N.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h_CD, labels_C = h_cast[rows], labels_N[rows]
            valid_C = labels_C != IGNORE_INDEX
            # d CE / d logits = softmax - one_hot(label), scaled by each row's upstream grad
            grad_logits_CV = (_chunk_logits(h_CD, weight_cast) - lse_N[rows, None]).exp_()
            grad_logits_CV.scatter_add_(
                1, labels_C.clamp_min(0)[:, None], -valid_C[:, None].to(grad_logits_CV.dtype)
            )
            grad_logits_CV.mul_((grad_ce_N[rows] * valid_C)[:, None])
            grad_logits_CV = grad_logits_CV.to(dtype)
            if grad_h_ND is not None:
                grad_h_ND[rows] = grad_logits_CV @ weight_cast
            if grad_weight_VD is not None:
                grad_weight_VD += (grad_logits_CV.t() @ h_CD).float()
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        return grad_h_ND, grad_weight_VD, None, None, None


def chunked_linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Each row's CE (N,), float32, 0 where the label is IGNORE_INDEX."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return ChunkedLinearCrossEntropy.apply(
        h_ND, weight_VD, labels_N, chunk_rows, matmul_dtype(h_ND)
    )


@cache
def cut_cross_entropy_kernel():
    """cut-cross-entropy's `linear_cross_entropy`, or None when it is not installed."""
    try:
        from cut_cross_entropy import linear_cross_entropy  # optional ([fused-ce]): on use
    except ImportError:
        return None
    return linear_cross_entropy


def uses_fused_kernel(device: torch.device) -> bool:
    return device.type == "cuda" and cut_cross_entropy_kernel() is not None


def fused_linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor
) -> torch.Tensor:
    """cut-cross-entropy's kernel (CUDA, Ampere or newer), per-row CE in float32.
    filter_eps=None: no gradient filtering, so the gradients are the exact ones the
    dense and chunked paths give (not tested here: no GPU)."""
    dtype = matmul_dtype(h_ND)
    ce_N = cut_cross_entropy_kernel()(
        h_ND.to(dtype), weight_VD.to(dtype), labels_N,
        ignore_index=IGNORE_INDEX, reduction="none", filter_eps=None,
    )
    return ce_N.float()


def linear_cross_entropy(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Each row's CE (N,), float32, 0 at IGNORE_INDEX: the fused kernel on CUDA when
    cut-cross-entropy is installed, else the chunked path."""
    if uses_fused_kernel(h_ND.device):
        return fused_linear_cross_entropy(h_ND, weight_VD, labels_N)
    return chunked_linear_cross_entropy(h_ND, weight_VD, labels_N, chunk_rows)


def linear_cross_entropy_sums(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor,
    row_weight_N: torch.Tensor | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> LossSums:
    """The LossSums that objectives.(weighted_)cross_entropy_sums give for the logits
    h @ weight^T, without those logits saved for backward: sum of row_weight * CE (of
    CE without weights), the plain CE sum (detached), the count of valid labels."""
    ce_N = linear_cross_entropy(h_ND, weight_VD, labels_N, chunk_rows)
    return label_ce_sums(ce_N, labels_N, row_weight_N)
