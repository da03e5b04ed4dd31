import copy

import pytest
import torch
import torch.nn.functional as F

from diffusion_blocks import diffusion
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.models.vision_layers import AdaLNZeroLayer, PreNormLayer
from diffusion_blocks.models.vit.model import DiffusionBlocksViT, PlainViT
from torchtitan.components.lr_scheduler import build_lr_schedulers
from diffusion_blocks.models.vit.task import ImageClassificationTask
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
    """(c_skip, c_out, c_in, c_noise) written out here (docs/method.md section 4), not
    taken from diffusion/edm.py."""
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


def dropout_rates(model) -> set[tuple[str, float]]:
    """(kind, p) of every dropout in the model."""
    rates = {("embed", model.embed_dropout.p)}
    for layer in model.layers.values():
        rates |= {("hidden", layer.attention.dropout.p), ("hidden", layer.mlp.dropout.p),
                  ("attention", layer.attention.attention_dropout)}
    return rates


def test_paper_shape_config_parses_and_builds_on_meta():
    cfg = job_config("vit_cifar100.toml")
    spec_args = get_train_spec("dblocks_vit").model_args["cifar100"]
    assert (spec_args.n_layers, spec_args.dim, spec_args.n_heads, spec_args.patch_size) == (12, 128, 4, 4)
    # the official recipe: MLP width 3072 (Hugging Face ViTConfig's default), dropout 0.1
    for flavor in ("cifar100", "cifar10"):
        args = get_train_spec("dblocks_vit").model_args[flavor]
        assert (args.mlp_dim, args.dropout, args.attention_dropout) == (3072, 0.1, 0.1)
    assert cfg.diffusion_blocks.num_blocks == 3 and cfg.diffusion_blocks.overlap == 0.05
    model = build_on_meta(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert [list(r) for r in model.partition.layer_ranges] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert model.pos_embed.shape == (1, 65, 128) and model.head.out_features == 100
    twin_cfg = job_config("vit_cifar100_e2e.toml")
    twin = build_on_meta(twin_cfg)
    assert isinstance(twin, PlainViT) and len(twin.layers) == 12
    for m in (model, twin):
        assert all(layer.mlp.fc1.out_features == 3072 for layer in m.layers.values())
        assert dropout_rates(m) == {("embed", 0.1), ("hidden", 0.1), ("attention", 0.1)}
    assert model.model_args.label_init_std == 0.02
    for c in (cfg, twin_cfg):
        assert c.data.augment == "crop_flip" and c.data.crop_padding == 4
        assert c.training.local_batch_size == c.training.global_batch_size == 128
        opt = c.optimizer
        assert (opt.name, opt.lr, opt.weight_decay, opt.beta1, opt.beta2) == ("AdamW", 1e-3, 0.01, 0.9, 0.999)
    # the e2e twin: same flavor and recipe, a third of the steps (one of B = 3 blocks a step)
    assert not twin_cfg.diffusion_blocks.enable and cfg.diffusion_blocks.enable
    assert twin_cfg.model.flavor == "cifar100" and 3 * twin_cfg.training.steps == cfg.training.steps


@pytest.mark.parametrize("config", ["vit_cifar100.toml", "vit_cifar100_e2e.toml"])
def test_paper_recipe_lr_is_constant(config):
    cfg = job_config(config)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    schedulers = build_lr_schedulers([optimizer], cfg.lr_scheduler, cfg.training.steps)
    assert optimizer.param_groups[0]["lr"] == 1e-3
    factor = schedulers.schedulers[0].lr_lambdas[0]  # torchtitan's warmup-stable-decay
    assert {factor(step) for step in range(cfg.training.steps + 1)} == {1.0}


def randomised(model, seed=0):
    """The model with every parameter redrawn (fresh adaLN-Zero layers are the identity,
    so dropout inside them would not show)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def run(model, images, denoiser):
    if not denoiser:
        return model(images)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    z = torch.randn(4, model.model_args.dim, generator=torch.Generator().manual_seed(1))
    return model(images, block=0, sigma_B=sigma, z_BD=z).logits_BK


@pytest.mark.parametrize("config", ["vit_digits.toml", "vit_digits_e2e.toml"])
@pytest.mark.parametrize("key", ["dropout", "attention_dropout"])
def test_dropout_is_on_in_training_and_off_in_eval(config, key):
    images = torch.randn(4, 1, 8, 8)
    denoiser = config == "vit_digits.toml"
    plain, _ = build_on_cpu(config)
    assert {p for _, p in dropout_rates(plain)} == {0.0}  # the digits recipe has none
    model, _ = build_on_cpu(config, f"--model.{key}", "0.3")
    assert getattr(model.model_args, key) == 0.3
    randomised(plain), randomised(model)
    model.train()
    torch.manual_seed(0)
    first, second = run(model, images, denoiser), run(model, images, denoiser)
    assert not torch.allclose(first, second)
    model.eval(), plain.eval()
    expected = run(plain, images, denoiser)
    assert torch.equal(run(model, images, denoiser), expected)
    assert torch.equal(run(model, images, denoiser), expected)


@pytest.mark.parametrize("layer_cls", [PreNormLayer, AdaLNZeroLayer])
@pytest.mark.parametrize("rates", [(0.3, 0.0), (0.0, 0.3)], ids=["hidden", "attention"])
def test_layer_dropout_in_attention_and_mlp(layer_cls, rates):
    dropout, attention_dropout = rates
    torch.manual_seed(0)
    layer = randomised(layer_cls(32, 4, 4.0, dropout=dropout, attention_dropout=attention_dropout))
    plain = layer_cls(32, 4, 4.0)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 32)
    args = (x,) + ((torch.randn(2, 32),) if layer_cls is AdaLNZeroLayer else ())
    layer.train()
    assert not torch.allclose(layer(*args), layer(*args))
    # each sub-module drops: attention (probabilities or output), MLP output (hidden only)
    assert not torch.allclose(layer.attention(x), layer.attention(x))
    assert torch.allclose(layer.mlp(x), layer.mlp(x)) == (dropout == 0)
    layer.eval()
    assert torch.equal(layer(*args), plain(*args))


def test_dropout_reaches_the_noisy_label_token():
    model, _ = build_on_cpu("vit_digits.toml", "--model.dropout", "0.5")
    images, z_BD = torch.randn(3, 1, 8, 8), torch.randn(3, 64)
    sigma_B = torch.tensor([0.1, 1.0, 10.0])
    seen = []
    handle = model.layers["0"].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model.eval()
    model(images, block=0, sigma_B=sigma_B, z_BD=z_BD)
    model.train()
    torch.manual_seed(0)
    model(images, block=0, sigma_B=sigma_B, z_BD=z_BD)
    handle.remove()
    clean, dropped = seen[0][:, 0], seen[1][:, 0]  # position 0: the label token
    zeroed = dropped == 0
    assert 0.2 < zeroed.float().mean() < 0.8
    torch.testing.assert_close(dropped[~zeroed], clean[~zeroed] / 0.5)


def test_label_table_init_std_comes_from_the_flavor():
    flavors = get_train_spec("dblocks_vit").model_args
    assert flavors["digits"].label_init_std == 1.0
    assert flavors["cifar100"].label_init_std == flavors["cifar10"].label_init_std == 0.02
    for std in (1.0, 0.02):
        args = copy.deepcopy(flavors["cifar100"])
        args.n_layers, args.mlp_dim, args.label_init_std = 3, 8, std  # small and cheap
        args.update_from_config(job_config("vit_cifar100.toml"))
        torch.manual_seed(0)
        model = DiffusionBlocksViT(args)
        model.init_weights()
        table = model.label_embed.weight  # 100 x 128 draws
        assert table.shape == (100, 128)
        assert abs(table.std().item() / std - 1) < 0.05 and abs(table.mean().item()) < 0.05 * std


@pytest.mark.parametrize(
    "config,overrides,fragment",
    [
        ("vit_digits.toml", ["--model.dropout", "1.0"], "[model] dropout must lie in [0, 1), got 1.0"),
        ("vit_digits.toml", ["--model.attention_dropout", "-0.1"], "[model] attention_dropout must lie in [0, 1)"),
        ("dit_digits.toml", ["--model.dropout", "0.1"], "only the ViT has dropout"),
        ("vit_digits.toml", ["--data.augment", "flip"], "[data] augment 'flip' is not one of ['none', 'crop_flip']"),
        ("vit_digits.toml", ["--data.crop_padding", "-1"], "[data] crop_padding must be >= 0, got -1"),
    ],
)
def test_recipe_keys_reject_bad_values(config, overrides, fragment):
    with pytest.raises(ConfigError) as info:
        job_config(config, *overrides)
    assert fragment in str(info.value) and "command line" in str(info.value)


def test_dropout_with_activation_checkpointing_needs_preserved_rng():
    flags = ["--activation_checkpoint.mode", "full", "--activation_checkpoint.no-preserve-rng-state"]
    with pytest.raises(ConfigError, match="preserve_rng_state = false would recompute"):
        build_on_meta(job_config("vit_cifar100.toml", *flags))
    build_on_meta(job_config("vit_cifar100.toml", *flags, "--model.dropout", "0", "--model.attention_dropout", "0"))
    build_on_meta(job_config("vit_digits.toml", *flags))  # no dropout: nothing to recompute
