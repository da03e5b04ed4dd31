"""KV-cached decoding (diffusion_blocks.models.llama3.kv_cache) against the uncached
path, on tiny real models: the block-wise denoiser and a stock llama3 twin (grouped
keys and values, 2 kv heads for 4 query heads). The same tokens, the same logits at
every block call, the cache rebuilt when the context stops extending it, and the work
per new token independent of the context length."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.models.llama3 import kv_cache
from diffusion_blocks.models.llama3.args import DenoiserOptions
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, decoding_config, denoise_next_token_logits, forwards_per_token, generate,
    last_row_denoiser, owner_of,
)
from diffusion_blocks.models.recurrent import FAMILY as RECURRENT
from diffusion_blocks.protocols.family import TextRequest
from test_llama_model import make_model, SEQ
from test_stock_checkpoint import stock_model

REPO = Path(__file__).resolve().parents[1]
N_LAYERS = 4  # two blocks of two layers


def denoiser(sigma_per_token=False, dtype=torch.float32):
    options = DenoiserOptions(sigma_per_token=sigma_per_token)
    model = make_model(n_layers=N_LAYERS, n_kv_heads=2, denoiser=options)
    return as_dtype(sharpen_attention(model), dtype)


def twin(dtype=torch.float32):
    model = stock_model(0, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97,
                        max_seq_len=SEQ)
    return as_dtype(sharpen_attention(model.eval()), dtype)


@torch.no_grad()
def sharpen_attention(model):
    """Attention weights far from torchtitan's small init, so that every context token
    moves the logits (a stale cache row then shows)."""
    generator = torch.Generator().manual_seed(1)
    for layer in model.layers.values():
        for linear in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo):
            linear.weight.copy_(0.3 * torch.randn(linear.weight.shape, generator=generator))
    return model


def as_dtype(model, dtype):
    """Module.double() keeps the complex RoPE table (Module.to(float64) would drop its
    imaginary part)."""
    return model.double() if dtype == torch.float64 else model


def tokens(batch=2, length=SEQ, seed=0):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def both_ways(model, prompt_BT, max_context, **decoding):
    cached, uncached = (
        generate(model, prompt_BT, DecodingConfig(kv_cache=on, **decoding), max_context)
        for on in (True, False)
    )
    return cached, uncached


# ---------------------------------------------------------------------------
# The same tokens. float64 models: a sampled token (every ancestral step, and the final
# pick at temperature > 0) is a multinomial draw, which a 1e-7 difference in the logits
# (other matmul shapes, attention over T + 1 instead of 2T keys) can flip on another
# BLAS; the logits themselves are compared in float32 below.


@pytest.mark.parametrize("sampler", ["ancestral", "euler", "heun"])
@pytest.mark.parametrize("case", ["greedy", "sampled", "churn", "sigma_per_token", "window_slides"])
def test_denoiser_decodes_the_same_tokens_with_and_without_the_cache(sampler, case):
    model = denoiser(sigma_per_token=case == "sigma_per_token", dtype=torch.float64)
    decoding = dict(max_new_tokens=4, sampler=sampler, seed=1,
                    temperature=1.0 if case == "sampled" else 0.0,
                    churn=2.0 if case == "churn" else 0.0)
    # window_slides: a prompt longer than max_context, so every token moves the window
    prompt_BT, max_context = (tokens(length=8), 6) if case == "window_slides" else (tokens(length=3), SEQ)
    cached, uncached = both_ways(model, prompt_BT, max_context, **decoding)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("case", ["greedy", "sampled", "window_slides"])
def test_twin_decodes_the_same_tokens_with_and_without_the_cache(case):
    model = twin(torch.float64)
    prompt_BT, max_context = (tokens(length=8), 6) if case == "window_slides" else (tokens(length=3), SEQ)
    temperature = 1.0 if case == "sampled" else 0.0
    cached, uncached = both_ways(model, prompt_BT, max_context, max_new_tokens=6,
                                 temperature=temperature, seed=1)
    assert torch.equal(cached, uncached)


def test_generate_takes_the_cached_path_for_both_llama_models_only():
    class Other(torch.nn.Module):
        pass

    assert kv_cache.caches_denoiser(denoiser()) and not kv_cache.caches_twin(denoiser())
    assert kv_cache.caches_twin(twin()) and not kv_cache.caches_denoiser(twin())
    assert not kv_cache.caches_twin(Other()) and not kv_cache.caches_denoiser(Other())


# ---------------------------------------------------------------------------
# The same logits at every block call


def checked_last_row(cache: kv_cache.DenoiserKVCache, differences: list):
    """A `last_row` for denoise_next_token_logits: the cache's logits, each call also
    run uncached on the same state; records the largest difference."""

    def make(model, context_BT):
        cached, uncached = cache.last_row_denoiser(model, context_BT), last_row_denoiser(model, context_BT)

        def logits(z_BD, sigma, block):
            got_BV = cached(z_BD, sigma, block)
            differences.append((got_BV - uncached(z_BD, sigma, block)).abs().max().item())
            return got_BV

        return logits

    return make


@pytest.mark.parametrize("sampler,churn,sigma_per_token", [
    ("ancestral", 0.0, False), ("heun", 2.0, False), ("euler", 0.0, True),
])
def test_cached_block_logits_equal_the_uncached_ones_at_every_call(monkeypatch, sampler, churn, sigma_per_token):
    """Along a growing context (the prompt prefilled, then one token at a time), then a
    window that no longer extends it; buffers of 2 slots so they grow while decoding."""
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 2)
    model = denoiser(sigma_per_token=sigma_per_token)
    config = DecodingConfig(steps_per_block=2, sampler=sampler, churn=churn)
    sequence_BT = tokens()
    contexts = [sequence_BT[:, :length] for length in range(3, SEQ + 1)] + [sequence_BT[:, 2:]]
    cache, differences = kv_cache.DenoiserKVCache(), []
    generator = torch.Generator().manual_seed(0)
    for context_BT in contexts:
        denoise_next_token_logits(model, context_BT, config, generator,
                                  last_row=checked_last_row(cache, differences))
    assert len(differences) == len(contexts) * forwards_per_token(model, config)
    assert max(differences) < 1e-4  # logits of order 1-10


def test_cached_twin_logits_equal_the_uncached_ones(monkeypatch):
    monkeypatch.setattr(kv_cache, "MIN_CAPACITY", 2)
    model, cache = twin(), kv_cache.TwinKVCache()
    sequence_BT = tokens()
    contexts = [sequence_BT[:, :length] for length in range(3, SEQ + 1)]
    contexts += [sequence_BT, sequence_BT[:, 2:]]  # the same context again; a slid window
    with torch.no_grad():
        for context_BT in contexts:
            cached_BV = cache.next_token_logits(model, context_BT)
            assert torch.allclose(cached_BV, model(context_BT)[:, -1], atol=1e-4)


def test_a_context_that_does_not_extend_the_cached_one_is_decoded_afresh():
    """The cache follows a context; a changed token in the middle must not be served
    the old rows' keys and values (nor a wrong position, nor a missing newest row)."""
    model, cache = denoiser(), kv_cache.DenoiserKVCache()
    sequence_BT = tokens()
    edited_BT = sequence_BT.clone()
    edited_BT[:, 2] = (edited_BT[:, 2] + 1) % 97
    z_BD = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    sigma = 5.0  # high enough that the context matters
    block = owner_of(model.partition, sigma)
    with torch.no_grad():
        for context_BT in (sequence_BT[:, :6], sequence_BT[:, :7], edited_BT[:, :8]):
            got_BV = cache.last_row_denoiser(model, context_BT)(z_BD, sigma, block)
            want_BV = last_row_denoiser(model, context_BT)(z_BD, sigma, block)
            assert torch.allclose(got_BV, want_BV, atol=1e-4)
        # the edit shows: rows kept from the unedited context would give other logits
        unedited_BV = last_row_denoiser(model, sequence_BT[:, :8])(z_BD, sigma, block)
    assert (unedited_BV - want_BV).abs().max() > 0.1


# ---------------------------------------------------------------------------
# The work saved


def rows_per_token(model, prompt_BT, kv_cache_on: bool, new_tokens=4) -> list[int]:
    """Rows through the layers' feed-forward for each new token (batch rows not counted)."""
    counts, per_token = [0], []

    def count(module, inputs):
        counts[0] += inputs[0].shape[1]

    hooks = [layer.feed_forward.register_forward_pre_hook(count) for layer in model.layers.values()]
    try:
        def on_token():
            per_token.append(counts[0])
            counts[0] = 0

        generate(model, prompt_BT, DecodingConfig(max_new_tokens=new_tokens, kv_cache=kv_cache_on),
                 SEQ, on_token=on_token)
    finally:
        for hook in hooks:
            hook.remove()
    return per_token


@pytest.mark.parametrize("sigma_per_token", [False, True])
def test_cached_denoiser_runs_the_same_rows_per_token_whatever_the_context(sigma_per_token):
    model = denoiser(sigma_per_token=sigma_per_token)
    calls = forwards_per_token(model, DecodingConfig())  # 2 steps (one per block) + the final read
    layers_per_call = N_LAYERS // 2
    short, long = (rows_per_token(model, tokens(length=n), True) for n in (2, 7))
    # each call: the newest clean row and the noisy row; with sigma_per_token the final
    # read shares block 1's cache with its step, which has just added the clean row
    per_token = calls * layers_per_call * 2 - (layers_per_call if sigma_per_token else 0)
    assert short[1:] == long[1:] == [per_token] * 3
    assert long[0] > short[0]  # the first token prefills the prompt
    uncached = rows_per_token(model, tokens(length=7), False)
    assert uncached == [calls * layers_per_call * 2 * t for t in range(7, 11)]


def test_cached_twin_runs_one_row_per_token_and_layer():
    model = twin()
    short, long = (rows_per_token(model, tokens(length=n), True) for n in (2, 7))
    assert short[1:] == long[1:] == [3] * 3 and long[0] == 3 * 7
    assert rows_per_token(model, tokens(length=7), False) == [3 * t for t in range(7, 11)]


# ---------------------------------------------------------------------------
# The switch


def test_the_request_switch_reaches_the_decoding_and_other_families_refuse_it():
    job_config = type("JobConfig", (), {
        "diffusion_blocks": type("Section", (), {"sampling_steps_per_block": 1})()})()
    assert decoding_config(TextRequest(), job_config).kv_cache
    assert not decoding_config(TextRequest(kv_cache=False), job_config).kv_cache
    with pytest.raises(ValueError, match="^--no-kv-cache does not apply to dblocks_recurrent"):
        RECURRENT.sample_text(None, None, None, TextRequest(kv_cache=False))
    with pytest.raises(ValueError, match="^--no-kv-cache does not apply to dblocks_md4"):
        from diffusion_blocks.models.md4 import FAMILY as MD4
        MD4.sample_text(None, None, None, TextRequest(kv_cache=False))


# ---------------------------------------------------------------------------
# tools/bench/generate.py


def test_bench_generate_prints_one_row_per_context_length():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench" / "generate.py"), "--json",
         "--context-lengths", "4,9", "--new-tokens", "3", "--batch-size", "2",
         "--model.flavor", "debugmodel", "--diffusion_blocks.num_blocks", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [r["context_length"] for r in rows] == [4, 9]
    for row in rows:
        assert {"context_length", "dblocks_tokens_per_s", "e2e_tokens_per_s", "ratio"} <= set(row)
        assert row["dblocks_tokens_per_s"] > 0 and row["e2e_tokens_per_s"] > 0 and row["ratio"] > 0
        assert row["kv_cache"] and row["num_blocks"] == 2
    # each prompt length says when it starts (a long CPU prefill must not look hung)
    assert [line.split(":")[0] for line in result.stderr.splitlines()
            if line.startswith("context ")] == ["context 4", "context 9"]


def test_bench_generate_refuses_a_context_that_does_not_fit_in_one_line(capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "tools" / "bench" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--context-lengths", "60", "--new-tokens", "8", "--training.seq_len", "64",
                   "--model.flavor", "debugmodel", "--diffusion_blocks.num_blocks", "2"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --context-lengths 60: 60 + --new-tokens 8 tokens exceed the model's "
        "max_seq_len 64 ([training] seq_len); shorten them or raise --training.seq_len"
    )


def test_bench_generate_refuses_a_context_beyond_what_a_checkpoint_was_trained_for(tmp_path, monkeypatch, capsys):
    """With --checkpoint the model's max_seq_len is the config's [training] seq_len (128
    for the debug config): --context-lengths 100000 ends in one line before any forward,
    instead of a silent 100k-token prefill."""
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "tools" / "bench" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    loaded = []

    def load_model(job_config, checkpoint, device):
        loaded.append(job_config.training.seq_len)
        return SimpleNamespace(model_args=SimpleNamespace(max_seq_len=job_config.training.seq_len)), None

    monkeypatch.setattr(tool, "load_model", load_model)
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--context-lengths", "100000", "--checkpoint", str(tmp_path)])
    assert stopped.value.code == 2 and loaded == [128]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: --context-lengths 100000: 100000 + --new-tokens 32 tokens exceed the model's max_seq_len 128")
