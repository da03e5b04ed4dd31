import copy

import pytest
import torch
import torch.nn.functional as F

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.models.llama3.args import dblocks_llama3_flavors
from diffusion_blocks.models.llama3.model import (
    denoiser_dense_mask,
    denoiser_positions,
    DiffusionBlocksLlama,
)

SEQ = 12


def make_model(flavor="debugmodel_8l", num_blocks=2, seed=0, vocab_size=97, **overrides):
    """A tiny denoiser (dim 64, 4 heads, SEQ positions); `overrides` set other model
    args (n_layers, n_kv_heads, ...)."""
    args = copy.deepcopy(dblocks_llama3_flavors()[flavor])
    args.dim, args.n_heads, args.vocab_size, args.max_seq_len = 64, 4, vocab_size, SEQ
    for name, value in overrides.items():
        setattr(args, name, value)
    args.partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=num_blocks), args.n_layers)
    torch.manual_seed(seed)
    model = DiffusionBlocksLlama(args)
    model.init_weights()
    with torch.no_grad():  # leave AdaLN-Zero's identity start so attention matters
        for layer in model.layers.values():
            layer.adaln.linear.weight.normal_(std=0.2)
            layer.adaln.linear.bias.normal_(std=0.2)
        model.final_adaln.modulation.linear.weight.normal_(std=0.2)
    return model.eval()


def test_dense_mask_pattern():
    mask = denoiser_dense_mask(3, torch.device("cpu")).int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],  # clean 0 sees clean <= 0
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],  # noisy 0 (denoises x1) sees clean x0 and itself
        [1, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]
    # clean x_i and the noisy row denoising x_i share RoPE position i
    assert denoiser_positions(3, torch.device("cpu")).tolist() == [[0, 1, 2, 1, 2, 3]]


@pytest.mark.parametrize("block", [0, 1])
@pytest.mark.parametrize("row", [0, 5, SEQ - 1])
def test_noisy_row_ignores_the_future_and_other_noisy_rows(block, row):
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    z = torch.randn(2, SEQ, 64, generator=gen)
    sigma = torch.tensor([0.4, 3.0])

    def row_logits(tokens, z):
        return model.denoise(tokens, z, sigma, block).logits_BTV[:, row]

    reference = row_logits(tokens, z)
    # noisy row `row` denoises token row+1: it may see clean tokens 0..row only
    future = tokens.clone()
    future[:, row + 1:] = torch.randint(0, 97, future[:, row + 1:].shape, generator=gen)
    other_noisy = z.clone()
    others = [j for j in range(SEQ) if j != row]
    other_noisy[:, others] = torch.randn(2, len(others), 64, generator=gen)
    assert torch.allclose(row_logits(future, z), reference, atol=1e-5)
    assert torch.allclose(row_logits(tokens, other_noisy), reference, atol=1e-5)
    # positive controls: what the row may see does change it
    past = tokens.clone()
    past[:, row] = (past[:, row] + 1) % 97
    own = z.clone()
    own[:, row] += 1.0
    assert not torch.allclose(row_logits(past, z), reference, atol=1e-4)
    assert not torch.allclose(row_logits(tokens, own), reference, atol=1e-4)


def test_flex_flavor_falls_back_to_sdpa_on_cpu():
    model = make_model("debugmodel_8l_flex_attn")
    assert not model.uses_flex_attention(torch.device("cpu"))
    assert model.uses_flex_attention(torch.device("cuda"))
    assert isinstance(model.attention_mask(4, torch.device("cpu")), torch.Tensor)


@torch.no_grad()  # FlexAttention runs forward-only on CPU
@torch.no_grad()
def test_flex_attention_matches_masked_sdpa(monkeypatch):
    """The BlockMask of the flex flavors is the dense [clean ; noisy] mask. On the CPU
    (where the product never runs FlexAttention) through eager flex_attention: torch
    2.13's compiled CPU kernel, which torchtitan's FlexAttentionWrapper calls, is off by
    ~6e-4 at this size and has no backward. The compiled CUDA kernel is checked by the
    GPU report."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from diffusion_blocks.models.llama3 import model as llama_model

    sdpa_model = make_model("debugmodel_8l")
    flex_model = make_model("debugmodel_8l_flex_attn")
    flex_model.load_state_dict(sdpa_model.state_dict())
    monkeypatch.setattr(DiffusionBlocksLlama, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(llama_model, "FlexAttentionWrapper", lambda: flex_attention)

    assert isinstance(flex_model.attention_mask(SEQ, torch.device("cpu")), BlockMask)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    z = torch.randn(2, SEQ, 64, generator=gen)
    sigma = torch.tensor([0.1, 5.0])
    for block in (0, 1):
        expected = sdpa_model.denoise(tokens, z, sigma, block)
        got = flex_model.denoise(tokens, z, sigma, block)
        assert torch.allclose(got.logits_BTV, expected.logits_BTV, atol=1e-4, rtol=1e-4)
        assert torch.allclose(got.denoised_BTD, expected.denoised_BTD, atol=1e-5)


SD = 0.5  # sigma_data (the default)


def test_denoised_estimate_is_c_skip_z_plus_c_out_times_the_network_output():
    model = make_model()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    z = torch.randn(2, SEQ, 64, generator=gen)
    sigma = torch.tensor([0.1, 1.5])  # c_skip and c_out both matter
    block = 1
    # EDM factors written out here (docs/method.md section 4), not taken from diffusion/edm.py
    total = (sigma**2 + SD**2)[:, None, None]
    c_skip, c_out, c_in = SD**2 / total, sigma[:, None, None] * SD / total.sqrt(), 1 / total.sqrt()
    with torch.no_grad():
        got = model.denoise(tokens, z, sigma, block)
        # the network F by hand: [normalised clean embeddings ; c_in z], this block's
        # layers with the 2T mask and positions, the shared final norm at the noisy rows
        cond = model.sigma_embedder(sigma.log() / 4)
        x = torch.cat([F.normalize(model.tok_embeddings(tokens), dim=-1), c_in * z], dim=1)
        mask, positions = denoiser_dense_mask(SEQ, x.device), denoiser_positions(SEQ, x.device)
        for layer_id in model.partition.layer_ranges[block]:
            x = model.layers[str(layer_id)](x, cond, model.freqs_cis, mask, positions)
        network = model.norm(x[:, SEQ:])
        denoised = c_skip * z + c_out * network
        logits = model.output(model.final_adaln(denoised, cond))
    torch.testing.assert_close(got.denoised_BTD, denoised)
    torch.testing.assert_close(got.logits_BTV, logits)
    assert not torch.allclose(got.denoised_BTD, c_skip * z, atol=1e-2)  # F really counts


def test_the_blocks_layers_and_only_they_change_the_estimate():
    model = make_model()
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 97, (2, SEQ), generator=gen)
    z = torch.randn(2, SEQ, 64, generator=gen)
    sigma = torch.tensor([0.4, 3.0])
    before = model.denoise(tokens, z, sigma, 0).denoised_BTD
    (inside, *_), (outside, *_) = model.partition.layer_ranges
    with torch.no_grad():
        model.layers[str(outside)].feed_forward.w1.weight.add_(1.0)  # block 1's layer
    torch.testing.assert_close(model.denoise(tokens, z, sigma, 0).denoised_BTD, before)
    with torch.no_grad():
        model.layers[str(inside)].feed_forward.w1.weight.add_(1.0)   # block 0's layer
    assert not torch.allclose(model.denoise(tokens, z, sigma, 0).denoised_BTD, before, atol=1e-3)
