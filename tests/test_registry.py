import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.models.llama3.model import DenoiserLayer, DiffusionBlocksLlama
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import llama3_args, Transformer
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.protocols.train_spec import get_train_spec


def test_train_spec_is_registered_with_debug_and_large_flavors():
    spec = get_train_spec("dblocks_llama3")
    assert spec.model_cls is DiffusionBlocksLlama
    for flavor in ("debugmodel", "debugmodel_8l", "8B", "70B"):
        assert flavor in spec.model_args
    assert spec.model_args["8B"].dim == 4096 and spec.model_args["70B"].n_layers == 80
    # stock names keep their stock shapes; our 8-layer debug model has its own name
    for name, stock in llama3_args.items():
        if name in spec.model_args:
            ours = spec.model_args[name]
            assert (ours.dim, ours.n_layers, ours.n_heads, ours.vocab_size) == (
                stock.dim, stock.n_layers, stock.n_heads, stock.vocab_size), name
    assert spec.model_args["debugmodel"].n_layers == 6
    assert spec.model_args["debugmodel_8l"].n_layers == 8


def stock_debug_args(seq_len=16):
    import copy

    args = copy.deepcopy(llama3_args["debugmodel"])  # 6 layers, dim 256
    args.max_seq_len = seq_len
    return args


def job_config_with(write_toml, text):
    path = write_toml("conv.toml", '[model]\nconverters = ["diffusion_blocks"]\n' + text)
    return parse_job_config(["--job.config_file", str(path)])


def dummy_parallel_dims():
    return ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def test_converter_keeps_stock_weights_and_adds_conditioning(write_toml):
    job_config = job_config_with(write_toml, "[diffusion_blocks]\nnum_blocks = 3\n")
    torch.manual_seed(0)
    model = Transformer(stock_debug_args())
    with torch.no_grad():
        model.init_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    build_model_converters(job_config, dummy_parallel_dims()).convert(model)

    assert isinstance(model, DiffusionBlocksLlama)
    assert all(isinstance(layer, DenoiserLayer) for layer in model.layers.values())
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    added = set(after) - set(before)
    assert any(k.startswith("sigma_embedder.") for k in added)
    assert any(k.startswith("final_adaln.") for k in added)
    assert sum(k.startswith("layers.") and ".adaln." in k for k in added) == 2 * 6
    assert [list(r) for r in model.partition.layer_ranges] == [[0, 1], [2, 3], [4, 5]]

    # AdaLN-Zero: every converted layer starts as the identity
    x = torch.randn(2, 8, 256)
    cond = model.sigma_embedder(torch.tensor([0.1, -0.5]))
    layer = model.layers["3"]
    from diffusion_blocks.models.llama3.model import denoiser_dense_mask, denoiser_positions

    out = layer(x, cond, model.freqs_cis, denoiser_dense_mask(4, x.device), denoiser_positions(4, x.device))
    assert torch.equal(out, x)

    tokens = torch.randint(0, 2048, (2, 16))
    logits = model(tokens, tokens, block=1, sigma_B=torch.tensor([0.3, 2.0]), noise_BTD=torch.randn(2, 16, 256))
    assert logits.shape == (2, 16, 2048) and torch.isfinite(logits).all()


def test_converter_works_on_meta_then_materialises(write_toml):
    job_config = job_config_with(write_toml, "[diffusion_blocks]\nnum_blocks = 2\n")
    with torch.device("meta"):
        model = Transformer(stock_debug_args())
    build_model_converters(job_config, dummy_parallel_dims()).convert(model)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(buffer_device=torch.device("cpu"))
    assert model.freqs_cis.shape[0] == 17  # one RoPE position past seq_len for noisy rows
    for layer in model.layers.values():
        assert torch.count_nonzero(layer.adaln.linear.weight) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_converter_rejects_num_blocks_that_do_not_fit(write_toml):
    job_config = job_config_with(write_toml, "[diffusion_blocks]\nnum_blocks = 4\n")
    with torch.device("meta"):
        model = Transformer(stock_debug_args())
    with pytest.raises(ValueError, match="num_blocks = 4 does not split the model's 6 layers"):
        build_model_converters(job_config, dummy_parallel_dims()).convert(model)


def test_stock_checkpoint_initialises_the_dblocks_spec_model(write_toml):
    # a stock llama3 state dict loads into the registered denoiser (strict=False only
    # for the added conditioning modules)
    spec = get_train_spec("dblocks_llama3")
    import copy

    args = copy.deepcopy(spec.model_args["debugmodel_8l"])
    job_config = job_config_with(write_toml, "[training]\nseq_len = 16\n")
    args.update_from_config(job_config)
    denoiser = DiffusionBlocksLlama(args)
    stock = Transformer(copy.deepcopy(llama3_args["debugmodel"]).__class__(
        **{**vars(llama3_args["debugmodel"]), "n_layers": 8, "n_heads": 8, "max_seq_len": 16}))
    with torch.no_grad():
        stock.init_weights()
    missing, unexpected = denoiser.load_state_dict(stock.state_dict(), strict=False)
    assert not unexpected
    assert all("adaln" in k or "sigma_embedder" in k for k in missing)
