import torch
import torch.nn.functional as F

from diffusion_blocks import diffusion
from diffusion_blocks.models.vit import DiffusionBlocksViT, PlainViT
from diffusion_blocks.vision_tasks import ImageClassificationTask
from torchtitan.protocols.train_spec import get_train_spec
from vision_helpers import build_on_cpu, build_on_meta, job_config, LayerCallRecorder


def test_noisy_label_token_sits_at_position_0_scaled_by_c_in():
    model, _ = build_on_cpu("vit_digits.toml")
    images = torch.randn(3, 1, 8, 8)
    z_BD = torch.randn(3, 64)
    sigma_B = torch.tensor([0.01, 0.5, 40.0])
    block = 1
    first_layer = model.layers[str(model.partition.layer_ranges[block][0])]
    seen = {}
    handle = first_layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    model(images, block=block, sigma_B=sigma_B, z_BD=z_BD)
    handle.remove()
    x_BTD = seen["x"]
    assert x_BTD.shape == (3, 1 + 16, 64)
    c_in = diffusion.c_in(sigma_B, model.partition.schedule.sigma_data)
    torch.testing.assert_close(x_BTD[:, 0], c_in[:, None] * z_BD + model.pos_embed[0, 0])
    torch.testing.assert_close(x_BTD[:, 1:], model.patch_embed(images) + model.pos_embed[0, 1:])


def test_training_target_is_the_normalised_label_embedding_plus_noise():
    model, _ = build_on_cpu("vit_digits.toml")
    labels = torch.tensor([3, 7])
    noise = torch.randn(2, 64)
    sigma = torch.tensor([0.2, 3.0])
    table = F.normalize(model.label_embed.weight, dim=-1)
    assert torch.allclose(table.norm(dim=-1), torch.ones(10))
    from_labels = model(torch.zeros(2, 1, 8, 8), block=0, sigma_B=sigma, labels_B=labels, noise_BD=noise)
    from_z = model(torch.zeros(2, 1, 8, 8), block=0, sigma_B=sigma, z_BD=table[labels] + sigma[:, None] * noise)
    torch.testing.assert_close(from_labels.logits_BK, from_z.logits_BK)
    # the label-space estimate is softmax(logits) @ normalised table
    torch.testing.assert_close(from_z.label_estimate_BD, from_z.logits_BK.softmax(-1) @ table)


SD = 0.5  # sigma_data of the configs


def edm_factors(sigma_B: torch.Tensor):
    """(c_skip, c_out, c_in, c_noise) written out here (DESIGN.md section 4), not
    taken from diffusion.py."""
    total = sigma_B**2 + SD**2
    return SD**2 / total, sigma_B * SD / total.sqrt(), 1 / total.sqrt(), sigma_B.log() / 4


def with_live_conditioning(model, seed: int = 0):
    """Random AdaLN-Zero and final-AdaLN weights: at init every layer is the identity
    and the gates are zero, so the layers would not change the network's output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adaln." in name or "final_adaln." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def test_denoised_estimate_is_c_skip_z_plus_c_out_times_the_network_output():
    model = with_live_conditioning(build_on_cpu("vit_digits.toml")[0]).eval()
    gen = torch.Generator().manual_seed(3)
    images, z_BD = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 64, generator=gen)
    sigma_B = torch.tensor([0.05, 0.5, 2.0])  # c_skip and c_out both matter
    block = 1
    c_skip, c_out, c_in, c_noise = edm_factors(sigma_B)
    with torch.no_grad():
        got = model(images, block=block, sigma_B=sigma_B, z_BD=z_BD)
        # the network F by hand: label token c_in z at position 0, this block's layers,
        # the shared final norm at position 0
        cond_BD = model.sigma_embedder(c_noise)
        x_BTD = torch.cat([(c_in[:, None] * z_BD)[:, None], model.patch_embed(images)], 1) + model.pos_embed
        for layer_id in model.partition.layer_ranges[block]:
            x_BTD = model.layers[str(layer_id)](x_BTD, cond_BD)
        network_BD = model.norm(x_BTD[:, 0])
        denoised_BD = c_skip[:, None] * z_BD + c_out[:, None] * network_BD
        logits_BK = model.head(model.final_adaln(denoised_BD[:, None], cond_BD)[:, 0])
    torch.testing.assert_close(got.logits_BK, logits_BK)
    table_KD = F.normalize(model.label_embed.weight, dim=-1)
    torch.testing.assert_close(got.label_estimate_BD, logits_BK.softmax(-1) @ table_KD)
    # the estimate without the network (c_skip z alone) would give other logits
    skip_only = model.head(model.final_adaln((c_skip[:, None] * z_BD)[:, None], cond_BD)[:, 0])
    assert not torch.allclose(got.logits_BK, skip_only, atol=1e-3)


def test_the_blocks_layers_and_only_they_change_the_estimate():
    model = with_live_conditioning(build_on_cpu("vit_digits.toml")[0]).eval()
    gen = torch.Generator().manual_seed(4)
    images, z_BD = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 64, generator=gen)
    sigma_B = torch.tensor([0.3, 0.6])

    def logits(block):
        with torch.no_grad():
            return model(images, block=block, sigma_B=sigma_B, z_BD=z_BD).logits_BK

    before = logits(0)
    (inside, *_), (outside, *_) = model.partition.layer_ranges
    with torch.no_grad():
        model.layers[str(outside)].mlp.fc1.weight.add_(1.0)  # block 1's layer
    torch.testing.assert_close(logits(0), before)
    with torch.no_grad():
        model.layers[str(inside)].mlp.fc1.weight.add_(1.0)   # block 0's layer
    assert not torch.allclose(logits(0), before, atol=1e-3)


def test_fresh_layers_are_the_identity_adaln_zero():
    model, _ = build_on_cpu("vit_digits.toml")
    x = torch.randn(2, 17, 64)
    cond = model.sigma_embedder(torch.tensor([0.1, -1.0]))
    assert torch.equal(model.layers["0"](x, cond), x)


def test_classify_runs_only_the_owning_block_at_each_step():
    model, _ = build_on_cpu("vit_digits.toml", "--diffusion_blocks.sampling_steps_per_block", "3")
    recorder = LayerCallRecorder(model)
    logits = model.classify(torch.randn(4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    recorder.remove()
    plan = model.partition.sampling_plan(model.partition.num_blocks * 3)
    assert logits.shape == (4, 10)
    # one call per Euler step, then the final logits at sigma_min (last block)
    expected = [list(model.partition.layer_ranges[step.block]) for step in plan]
    expected.append(list(model.partition.layer_ranges[-1]))
    assert recorder.calls == expected
    assert [step.block for step in plan] == [0, 0, 0, 1, 1, 1]


def test_losses_of_both_modes():
    task = ImageClassificationTask()
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    model, _ = build_on_cpu("vit_digits.toml")
    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0])
    out = task.denoiser_loss(model, {"input": images}, labels, 1, sigma, torch.Generator().manual_seed(0))
    # w(sigma) = (s^2 + sd^2) / (s sd)^2 = 1 / s^2 + 1 / sd^2, by hand for sd = 0.5
    weights = torch.tensor([10004.0, 104.0, 5.0, 4.01])
    # sums over the items (the trainer divides by the global item count)
    assert out.num_items == 4 and out.loss_sum > 0 and out.unweighted_sum > 0
    noise = torch.randn(4, model.model_args.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(images, block=1, sigma_B=sigma, labels_B=labels, noise_BD=noise).logits_BK
    ce_B = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(out.loss_sum.detach(), (weights * ce_B).sum())
    torch.testing.assert_close(out.unweighted_sum, ce_B.sum())
    twin, _ = build_on_cpu("vit_digits_e2e.toml")
    assert isinstance(twin, PlainViT)
    e2e = task.end_to_end_loss(twin, {"input": images}, labels, {}, torch.Generator())
    assert e2e.num_items == 4
    assert torch.isclose(e2e.loss_sum / e2e.num_items, F.cross_entropy(twin(images), labels))
    assert twin.classify(images).shape == (4, 10)


def test_twin_has_the_same_layers_and_shapes_plus_cls():
    model, _ = build_on_cpu("vit_digits.toml")
    twin, _ = build_on_cpu("vit_digits_e2e.toml")
    assert type(model) is DiffusionBlocksViT and type(twin) is PlainViT
    assert len(model.layers) == len(twin.layers) == 4
    for name in ("attention.qkv.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        assert model.layers["2"].get_parameter(name).shape == twin.layers["2"].get_parameter(name).shape
    assert twin.cls_token.shape == (1, 64) and not hasattr(twin, "label_embed")


def test_paper_shape_config_parses_and_builds_on_meta():
    cfg = job_config("vit_cifar100.toml")
    spec_args = get_train_spec("dblocks_vit").model_args["cifar100"]
    assert (spec_args.n_layers, spec_args.dim, spec_args.n_heads, spec_args.patch_size) == (12, 128, 4, 4)
    assert cfg.diffusion_blocks.num_blocks == 3 and cfg.diffusion_blocks.overlap == 0.05
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert [list(r) for r in model.partition.layer_ranges] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert model.pos_embed.shape == (1, 65, 128) and model.head.out_features == 100
    twin = build_on_meta(job_config("vit_cifar100.toml", "--diffusion_blocks.no-enable"))
    assert isinstance(twin, PlainViT) and len(twin.layers) == 12
