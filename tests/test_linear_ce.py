"""The chunked linear cross-entropy: the same loss and gradients as the dense head + CE,
with IGNORE_INDEX labels and w(sigma) weights, with fewer bytes saved for backward.
The CUDA fused kernel (cut-cross-entropy) is not tested here: no GPU."""

import pytest
import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from diffusion_blocks.linear_ce import chunked_linear_cross_entropy, linear_cross_entropy_sums
from diffusion_blocks.memory import count_saved_activations
from diffusion_blocks.objectives import cross_entropy_sums, weighted_cross_entropy_sums

N, D, V = 37, 16, 50  # 37 rows: no chunk size below divides it


def head_inputs(dtype, seed=0):
    """h (N, D) computed from a leaf (so it counts as an activation), the head weight
    (V, D), labels with every fifth one IGNORE_INDEX, positive per-row weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, D, generator=gen)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::5] = IGNORE_INDEX
    row_weight = 10 * torch.rand(N, generator=gen) + 0.1
    return x, weight, labels, row_weight


def dense_sums(h_ND, weight, labels, row_weight):
    """Today's path: the head's logits, then objectives' CE sums."""
    logits = F.linear(h_ND, weight)[None]  # (1, N, V): one sequence of N tokens
    if row_weight is None:
        return cross_entropy_sums(logits, labels[None])
    # weighted_cross_entropy_sums weighs by w(sigma) = (s^2 + sd^2) / (s sd)^2; with
    # sd = 1 the per-token sigma s = 1 / sqrt(r - 1) gives w = r for any r > 1
    sigma_BT = (row_weight[None] - 1).clamp_min(1e-3).rsqrt()
    return weighted_cross_entropy_sums(logits, labels[None], sigma_BT, 1.0)


def sums_and_grads(sums_fn, x, weight):
    sums = sums_fn()
    grad_x, grad_weight = torch.autograd.grad(sums.loss_sum, (x, weight))
    return sums, grad_x, grad_weight


# bfloat16: both paths round the logits to bfloat16 before the float32 CE; the
# gradients differ by bfloat16 rounding of the matmuls' results
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 8, N, 1000])
def test_chunked_equals_dense_loss_and_gradients(dtype, weighted, chunk_rows):
    x, weight, labels, row_weight = head_inputs(dtype)
    row_weight = (row_weight + 1.5) if weighted else None  # r > 1, see dense_sums
    dense, dense_gx, dense_gw = sums_and_grads(
        lambda: dense_sums(x * 1.0, weight, labels, row_weight), x, weight
    )
    chunked, chunked_gx, chunked_gw = sums_and_grads(
        lambda: linear_cross_entropy_sums(x * 1.0, weight, labels, row_weight, chunk_rows),
        x, weight,
    )
    tol = TOLERANCES[dtype]
    assert chunked.num_items == dense.num_items == N - len(range(0, N, 5))
    assert not chunked.unweighted_sum.requires_grad
    torch.testing.assert_close(chunked.loss_sum, dense.loss_sum, **tol)
    torch.testing.assert_close(chunked.unweighted_sum, dense.unweighted_sum, **tol)
    scale_x, scale_w = dense_gx.abs().max(), dense_gw.abs().max()
    assert chunked_gx.dtype == dtype and chunked_gw.dtype == dtype
    torch.testing.assert_close(chunked_gx / scale_x, dense_gx / scale_x, **tol)
    torch.testing.assert_close(chunked_gw / scale_w, dense_gw / scale_w, **tol)
    # ignored rows get no gradient
    assert not chunked_gx[labels == IGNORE_INDEX].any()


def test_chunked_ce_is_zero_at_ignored_labels_and_matches_per_row():
    x, weight, labels, _ = head_inputs(torch.float32)
    ce_N = chunked_linear_cross_entropy(x, weight, labels, chunk_rows=8)
    expected = F.cross_entropy(F.linear(x, weight), labels, reduction="none")
    torch.testing.assert_close(ce_N, expected)
    assert ce_N.dtype == torch.float32 and not ce_N[labels == IGNORE_INDEX].any()
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        chunked_linear_cross_entropy(x, weight, labels, chunk_rows=0)


def test_chunked_saves_no_logits():
    x, weight, labels, row_weight = head_inputs(torch.float32)
    counts = {}
    for name, sums_fn in (("dense", dense_sums), ("chunked", linear_cross_entropy_sums)):
        with count_saved_activations(torch.nn.Module()) as counter:
            sums_fn(x * 1.0, weight, labels, row_weight + 1.5).loss_sum.backward()
        counts[name] = counter.bytes
    # chunked: h, one logsumexp per row, the labels and the weights the sum uses
    assert counts["chunked"] == N * D * 4 + N * 4 + N * 8 + N * 4
    # dense saves the (N, V) float32 log-softmax instead of the logsumexp
    assert counts["dense"] - counts["chunked"] >= N * V * 4 - N * 4
