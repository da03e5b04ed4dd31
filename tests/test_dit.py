import pytest
import torch

from diffusion_blocks.diffusion.sampling import classifier_free_guidance
from diffusion_blocks.models.dit.model import DiffusionBlocksDiT, EndToEndDiT
from diffusion_blocks.models.dit.task import ImageGenerationTask
from diffusion_blocks.models.vision_layers import patchify, unpatchify
from torchtitan.protocols.train_spec import get_train_spec
from vision_helpers import build_on_cpu, build_on_meta, job_config, LayerCallRecorder


def test_patchify_and_unpatchify_are_inverse():
    images = torch.randn(2, 3, 8, 8)
    patches = patchify(images, 2)
    assert patches.shape == (2, 16, 12)
    assert torch.equal(unpatchify(patches, 3, 2), images)
    # token t covers rows 2*(t // 4) .. +1 and columns 2*(t % 4) .. +1
    assert torch.equal(patches[0, 5].view(2, 2, 3).permute(2, 0, 1), images[0, :, 2:4, 2:4])


def test_preconditioning_at_init_gives_c_skip_z():
    # the zero-initialised head makes F = 0, so D = c_skip z + c_out * 0
    model, _ = build_on_cpu("dit_digits.toml")
    z = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    denoised = model(z, sigma, torch.tensor([1, 2, 10]), block=0)
    torch.testing.assert_close(denoised, edm_factors(sigma)[0] * z)


SD = 0.5  # sigma_data of the configs


def edm_factors(sigma_B: torch.Tensor):
    """(c_skip, c_out, c_in, c_noise) as (B, 1, 1, 1) image factors, written out here
    (docs/method.md section 4), not taken from diffusion/edm.py."""
    total = sigma_B**2 + SD**2
    image = lambda t: t[:, None, None, None]  # noqa: E731
    return image(SD**2 / total), image(sigma_B * SD / total.sqrt()), image(1 / total.sqrt()), sigma_B.log() / 4


def with_live_network(model, seed: int = 0):
    """Random AdaLN-Zero / final-AdaLN weights and head: at init the layers are the
    identity and the zero head makes the network's output 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adaln." in name or "final_adaln." in name or name.startswith("head."):
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def test_denoised_estimate_is_c_skip_z_plus_c_out_times_the_network_output():
    model = with_live_network(build_on_cpu("dit_digits.toml")[0]).eval()
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 1, 8, 8, generator=gen)
    sigma = torch.tensor([0.05, 0.5, 2.0])  # c_skip and c_out both matter
    classes = torch.tensor([1, 2, 10])
    block = 1
    c_skip, c_out, c_in, c_noise = edm_factors(sigma)
    with torch.no_grad():
        denoised = model(z, sigma, classes, block=block)
        # the network F by hand on c_in z: patches + positions, this block's layers
        # conditioned on sigma and class, final AdaLN, head, back to an image
        cond = model.sigma_embedder(c_noise) + model.class_embed(classes)
        x = model.patch_embed(c_in * z) + model.pos_embed
        for layer_id in model.partition.layer_ranges[block]:
            x = model.layers[str(layer_id)](x, cond)
        network = unpatchify(model.head(model.final_adaln(x, cond)), 1, 2)
    assert network.abs().mean() > 0.1  # the network's output is not negligible
    torch.testing.assert_close(denoised, c_skip * z + c_out * network)


def test_the_blocks_layers_and_only_they_change_the_estimate():
    model = with_live_network(build_on_cpu("dit_digits.toml")[0]).eval()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    sigma, classes = torch.tensor([0.3, 0.6]), torch.tensor([0, 7])

    def denoised():
        with torch.no_grad():
            return model(z, sigma, classes, block=0)

    before = denoised()
    (inside, *_), (outside, *_) = model.partition.layer_ranges
    with torch.no_grad():
        model.layers[str(outside)].mlp.fc1.weight.add_(1.0)  # block 1's layer
    torch.testing.assert_close(denoised(), before)
    with torch.no_grad():
        model.layers[str(inside)].mlp.fc1.weight.add_(1.0)   # block 0's layer
    assert not torch.allclose(denoised(), before, atol=1e-3)


def test_classifier_free_guidance_combines_conditional_and_null_estimates():
    d_cond, d_uncond = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(classifier_free_guidance(d_cond, d_uncond, 1.0), d_cond)
    assert torch.equal(classifier_free_guidance(d_cond, d_uncond, 0.0), d_uncond)
    assert torch.equal(classifier_free_guidance(d_cond, d_uncond, 2.0), torch.tensor([5.0, -3.0]))


@pytest.mark.parametrize("scale", [1.0, 2.0, 3.5])
def test_guided_denoise_with_a_stub_network(scale):
    # stub: D = z + class (the null class 10 gives z + 10); guidance must be
    # D_u + s (D_c - D_u) = z + 10 + s (c - 10)
    model, _ = build_on_cpu("dit_digits.toml")
    calls = []

    def stub(z, sigma, classes, *, block):
        calls.append((len(z), block))
        return z + classes.float()[:, None, None, None]

    model.forward = stub
    z = torch.randn(2, 1, 8, 8)
    out = model.guided_denoise(z, 0.7, torch.tensor([3, 5]), block=1, cfg_scale=scale)
    expected = z + 10 + scale * (torch.tensor([3.0, 5.0]) - 10)[:, None, None, None]
    torch.testing.assert_close(out, expected)
    # conditional and unconditional in ONE batched call (one call at s = 1)
    assert calls == [(2, 1)] if scale == 1.0 else calls == [(4, 1)]


@pytest.mark.parametrize("config,num_steps", [("dit_digits.toml", 7), ("dit_digits_e2e.toml", 5)])
def test_sampling_runs_only_the_owning_block_at_each_step(config, num_steps):
    model, _ = build_on_cpu(config, "--diffusion_blocks.num_blocks", "4")
    recorder = LayerCallRecorder(model)
    images = model.sample(torch.tensor([0, 9]), num_steps, 2.0, torch.Generator().manual_seed(0))
    recorder.remove()
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    plan = model.partition.sampling_plan(num_steps)
    assert recorder.calls == [list(model.partition.layer_ranges[step.block]) for step in plan]
    if isinstance(model, EndToEndDiT):
        assert all(call == [0, 1, 2, 3] for call in recorder.calls)
    else:
        assert [step.block for step in plan] == sorted(step.block for step in plan)
        assert {step.block for step in plan} == {0, 1, 2, 3}
        assert all(len(call) == 1 for call in recorder.calls)


def test_label_dropout_uses_the_null_class_at_the_configured_rate():
    model, _ = build_on_cpu("dit_digits.toml", "--diffusion_blocks.label_dropout", "0.25")
    labels = torch.randint(0, 10, (20000,))
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    is_null = dropped == 10
    assert model.null_class == 10 and model.class_embed.num_embeddings == 11
    assert abs(is_null.float().mean() - 0.25) < 0.02
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_end_to_end_twin_is_one_denoiser_over_all_sigma():
    task = ImageGenerationTask()
    model, _ = build_on_cpu("dit_digits_e2e.toml")
    assert isinstance(model, EndToEndDiT)
    assert model.partition.layer_ranges == (range(4),)
    assert model.partition.training_interval(0) == (0.002, 80.0)
    images, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    out = task.end_to_end_loss(model, {"input": images}, labels, {}, torch.Generator().manual_seed(0))
    assert out.num_items == 8 and out.loss_sum > 0 and torch.isfinite(out.loss_sum)
    blocks, _ = build_on_cpu("dit_digits.toml")
    assert type(blocks) is DiffusionBlocksDiT
    assert [list(r) for r in blocks.partition.layer_ranges] == [[0, 1], [2, 3]]
    assert {n for n, _ in blocks.named_parameters()} == {n for n, _ in model.named_parameters()}


def test_weighted_l2_loss_of_one_block():
    task = ImageGenerationTask()
    model, _ = build_on_cpu("dit_digits.toml", "--diffusion_blocks.label_dropout", "0.0")
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    sigma = torch.tensor([0.05, 0.1, 0.2, 0.3])
    out = task.denoiser_loss(model, {"input": images}, torch.arange(4), 1, sigma, torch.Generator().manual_seed(0))
    # at init D = c_skip z; recompute the loss from the same noise
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    z = images + sigma[:, None, None, None] * noise
    c_skip = edm_factors(sigma)[0]
    se = (c_skip * z - images).pow(2).flatten(1).mean(1)
    # w(sigma) = (s^2 + sd^2) / (s sd)^2 = 1 / s^2 + 1 / sd^2, by hand for sd = 0.5
    weights = torch.tensor([404.0, 104.0, 29.0, 4 + 1 / 0.09])
    # a sum over the images (the trainer divides by the global image count)
    assert out.num_items == 4
    torch.testing.assert_close(out.loss_sum, (weights * se).sum())
    torch.testing.assert_close(out.unweighted_sum, se.sum())


def test_paper_shapes_parse_and_build_on_meta():
    flavors = get_train_spec("dblocks_dit").model_args
    shape = lambda a: (a.n_layers, a.dim, a.n_heads, a.patch_size)  # noqa: E731
    assert shape(flavors["DiT-S/2"]) == (12, 384, 6, 2)
    assert shape(flavors["DiT-L/2"]) == (24, 1024, 16, 2)
    cfg = job_config("dit_s2_cifar10.toml")
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert len(model.partition.layer_ranges) == 3 and model.head.out_features == 2 * 2 * 3
    large = build_on_meta(job_config("dit_s2_cifar10.toml", "--model.flavor", "DiT-L/2"))
    assert len(large.layers) == 24 and large.class_embed.num_embeddings == 1001
    n_params = sum(p.numel() for p in large.parameters())
    assert 400e6 < n_params < 500e6  # DiT-L/2: ~458M parameters


def test_cfg_scale_acts_on_the_sample():
    """An 'acts' check of the allow-list (tests/test_keys.py): cfg_scale, read only by
    dblocks_dit, changes what it samples (s = 1 is plain conditional sampling)."""
    model = with_live_network(build_on_cpu("dit_digits.toml")[0])
    classes = torch.tensor([0, 9])
    with torch.no_grad():
        plain, guided = (
            model.sample(classes, 3, scale, torch.Generator().manual_seed(0))
            for scale in (1.0, 3.0)
        )
    assert not torch.allclose(plain, guided)
