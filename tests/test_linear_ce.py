"""The chunked linear cross-entropy (`[diffusion_blocks] head_loss = "chunked"`): the
same loss and gradients as the dense head + CE, with IGNORE_INDEX labels and w(sigma)
weights, in training (denoiser and end-to-end twin), with fewer bytes saved for
backward. The CUDA fused kernel (cut-cross-entropy) is not tested here: no GPU."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from diffusion_blocks.components import linear_ce
from diffusion_blocks.components.linear_ce import (
    chunked_linear_cross_entropy,
    linear_cross_entropy_sums,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.diffusion.objectives import cross_entropy_sums, weighted_cross_entropy_sums
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.eval.memory import count_saved_activations, estimate_step
from diffusion_blocks.models.cross_entropy_head import (
    CrossEntropyHead, scoring_labels, use_cross_entropy_head,
)
from diffusion_blocks.models.llama3.task import LanguageModelTask
from diffusion_blocks.registry import resolve_run_spec

import _train_helpers as h
from test_llama_model import make_model, SEQ
from test_train_loop import data_of, logged_train_step, make_trainer, run_step  # noqa: F401 (fixture)

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


def fake_cut_cross_entropy(calls):
    """Stands in for cut_cross_entropy.linear_cross_entropy (its signature; the dense
    CE as its result), recording how it was called."""

    def linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None,
                             reduction="mean", shift=0, filter_eps="auto", **_):
        calls.append(dict(dtypes=(e.dtype, c.dtype), ignore_index=ignore_index,
                          reduction=reduction, filter_eps=filter_eps))
        return F.cross_entropy(F.linear(e, c).float(), targets, ignore_index=ignore_index,
                               reduction=reduction)

    return linear_cross_entropy


def test_fused_path_asks_cut_cross_entropy_for_exact_per_token_ce(monkeypatch):
    """Only the call contract: the kernel itself needs a GPU (untested here)."""
    calls = []
    monkeypatch.setattr(linear_ce, "cut_cross_entropy_kernel", lambda: fake_cut_cross_entropy(calls))
    x, weight, labels, _ = head_inputs(torch.float32)
    assert not linear_ce.uses_fused_kernel(x.device)  # the CPU always runs the chunked path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ce_N = linear_ce.fused_linear_cross_entropy(x, weight, labels)
    assert calls == [dict(dtypes=(torch.bfloat16, torch.bfloat16), ignore_index=IGNORE_INDEX,
                          reduction="none", filter_eps=None)]
    assert ce_N.shape == labels.shape and ce_N.dtype == torch.float32
    assert linear_ce.uses_fused_kernel(torch.device("cuda"))


# ---------------------------------------------------------------------------
# The denoiser: per-sequence and per-token sigma, the head swapped in place


def chunked_twin(model, chunk_rows=5):
    twin = copy.deepcopy(model)
    use_cross_entropy_head(twin, chunk_rows)
    return twin


def denoiser_loss_and_grads(model, sigma, labels):
    model.zero_grad()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, labels.shape, generator=gen)
    with count_saved_activations(model) as counter:
        sums = LanguageModelTask().denoiser_loss(
            model, {"input": tokens}, labels, 1, sigma, torch.Generator().manual_seed(4)
        )
        sums.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums, grads, counter.bytes


@pytest.mark.parametrize("per_token", [False, True])
def test_denoiser_chunked_head_equals_dense(per_token):
    model = make_model(vocab_size=97).train()
    model.options = dataclasses.replace(model.options, sigma_per_token=per_token)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 97, (2, SEQ), generator=gen)  # the denoiser embeds every label
    sigma = torch.exp(torch.randn((2, SEQ) if per_token else (2,), generator=gen))
    dense, dense_grads, dense_bytes = denoiser_loss_and_grads(model, sigma, labels)
    chunked_model = chunked_twin(model)
    assert isinstance(chunked_model.output, CrossEntropyHead)
    chunked, chunked_grads, chunked_bytes = denoiser_loss_and_grads(chunked_model, sigma, labels)
    torch.testing.assert_close(chunked.loss_sum, dense.loss_sum)
    torch.testing.assert_close(chunked.unweighted_sum, dense.unweighted_sum)
    assert chunked.num_items == dense.num_items == 2 * SEQ
    assert chunked_grads.keys() == dense_grads.keys() and "output.weight" in dense_grads
    for name, grad in dense_grads.items():  # to float32 round-off of each tensor's scale
        scale = grad.abs().max()
        torch.testing.assert_close(chunked_grads[name] / scale, grad / scale, msg=name)
    # the chunked head saves one logsumexp per row instead of the (B, T, V) log-softmax
    assert dense_bytes - chunked_bytes >= 2 * SEQ * (97 - 1) * 4
    # outside scoring_labels the chunked head is the plain head: logits
    tokens, z = labels, torch.randn(2, SEQ, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_model.denoise(tokens, z, sigma, 0).logits_BTV,
            model.denoise(tokens, z, sigma, 0).logits_BTV,
        )


def test_head_refuses_labels_of_another_shape():
    model = chunked_twin(make_model())
    with scoring_labels(model, torch.zeros(2, SEQ, dtype=torch.long)):
        with pytest.raises(ValueError, match="does not match labels"):
            model.output(torch.randn(3, SEQ, 64))
    assert model.output.labels is None


# ---------------------------------------------------------------------------
# Training steps of the debug LM: chunked == dense, block-wise and end to end


SEEDS = ["--debug.seed", "0", "--diffusion_blocks.seed", "0"]


@pytest.mark.parametrize("extra, rel", [
    ([], 1e-5),
    (["--diffusion_blocks.sigma_per_token"], 1e-5),
    (["--diffusion_blocks.no_enable"], 1e-5),
    # FSDP2 (one-rank mesh) holds the head in the root unit: the CE runs in its forward
    (["--diffusion_blocks.offload_inactive_blocks", "on"], 1e-5),
    # torchtitan's single-device AMP: the head's matmuls in bfloat16 under autocast
    (["--training.mixed_precision_param", "bfloat16"], 1e-3),
])
def test_training_step_with_chunked_head_equals_dense(make_trainer, extra, rel):  # noqa: F811
    logged = {}
    for head_loss in ("dense", "chunked"):
        rows = ["--diffusion_blocks.head_loss_chunk_rows", "7"] if head_loss == "chunked" else []
        trainer = make_trainer(*SEEDS, *extra, "--diffusion_blocks.head_loss", head_loss, *rows)
        assert isinstance(trainer.model.output, CrossEntropyHead) == (head_loss == "chunked")
        data = data_of(trainer)
        if trainer.enabled:
            logged[head_loss] = [run_step(trainer, data, block) for block in (0, 3)]
        else:
            logged[head_loss] = [logged_train_step(trainer, data) for _ in range(2)]
    # step 2's loss also checks step 1's update, so its gradients
    for dense, chunked in zip(logged["dense"], logged["chunked"]):
        assert chunked["loss"] == pytest.approx(dense["loss"], rel=rel)
        assert chunked["grad_norm"] == pytest.approx(dense["grad_norm"], rel=10 * rel)
        assert chunked[h.CE] == pytest.approx(dense[h.CE], rel=rel)


# ---------------------------------------------------------------------------
# Config and estimator


def debug_config(*overrides):
    return parse_job_config(["--job.config_file", str(h.DEBUG_TOML), *h.CPU, *overrides])


@pytest.mark.parametrize("overrides, fragments", [
    (["--diffusion_blocks.head_loss", "fused"], ["head_loss", "'fused'", "'dense'", "'chunked'"]),
    (["--diffusion_blocks.head_loss", "chunked", "--diffusion_blocks.head_loss_chunk_rows", "0"],
     ["head_loss_chunk_rows", ">= 1"]),
    (["--diffusion_blocks.head_loss_chunk_rows", "64"],
     ["head_loss_chunk_rows", "read only by head_loss = 'chunked'"]),
])
def test_bad_head_loss_settings_are_one_line_config_errors(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        debug_config(*overrides)
    message = str(info.value)
    assert "\n" not in message.strip()
    for fragment in fragments:
        assert fragment in message, message


def test_families_without_the_chunked_head_refuse_it():
    config = parse_job_config([
        "--job.config_file", str(h.REPO / "train_configs" / "recurrent_debug.toml"),
        "--diffusion_blocks.head_loss", "chunked",
    ])
    with pytest.raises(ConfigError, match=r"head_loss = 'chunked' is not read by dblocks_recurrent"):
        resolve_run_spec(config)


@pytest.mark.parametrize("extra", [[], ["--diffusion_blocks.no_enable"]])
def test_estimator_drops_the_log_softmax_with_the_chunked_head(extra):
    rows, vocab = 2 * 32, 2048  # batch x seq_len; debugmodel_8l's vocabulary
    shape = ["--training.seq_len", "32", "--training.local_batch_size", "2", *extra]
    dense = estimate_step(debug_config(*shape), nproc=1)
    chunked = estimate_step(debug_config(
        *shape, "--diffusion_blocks.head_loss", "chunked",
        "--diffusion_blocks.head_loss_chunk_rows", "16",
    ), nproc=1)
    # the (rows, V) float32 log-softmax goes, one logsumexp per row comes (and the
    # dense CE's scalar total weight goes)
    saved = dense.activation_bytes - chunked.activation_bytes
    assert saved == pytest.approx(rows * vocab * 4 - rows * 4, abs=8)
    assert chunked.resident.total == dense.resident.total
    assert (dense.transient_bytes - chunked.transient_bytes) == (rows - 16) * vocab * 4
