"""Starting a converted denoiser from a stock llama3 checkpoint (DCP or HF safetensors).

BlockwiseCheckpointManager loosens only the model-only initial load: it loads every
stock weight, leaves the modules convert_to_denoiser adds fresh, and refuses (one line)
any other missing key or a weight of another shape; resumes and seeds stay strict.
Single process, CPU: DCP runs without a process group here (it warns and goes on).
"""

import copy
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3 import llama3_args, Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

from diffusion_blocks.components.checkpoint import BlockwiseCheckpointManager
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.errors import CheckpointError
from diffusion_blocks.models.llama3.model import convert_to_denoiser, is_added_by_conversion

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

N_LAYERS = 6  # llama3 debugmodel


def model_args(**overrides):
    args = copy.deepcopy(llama3_args["debugmodel"])
    args.max_seq_len = 64
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def stock_model(seed: int, **overrides) -> Transformer:
    """A stock llama3 Transformer with random weights, norms too (not their init 1s)."""
    torch.manual_seed(seed)
    model = Transformer(model_args(**overrides))
    with torch.no_grad():
        model.init_weights()
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param))
    return model


def denoiser(seed: int = 1) -> Transformer:
    model = stock_model(seed)
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=3), N_LAYERS)
    convert_to_denoiser(model, partition)
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_dcp(state_dict, path: Path) -> str:
    """What torchtitan's model-only save writes: the flat model state dict as DCP."""
    dcp.save(state_dict, checkpoint_id=str(path))
    return str(path)


def save_hf(model: Transformer, path: Path) -> str:
    """The model as HF safetensors, written like torchtitan's last_save_in_hf (no index
    mapping: one consolidated file plus model.safetensors.index.json)."""
    hf_state_dict = Llama3StateDictAdapter(model.model_args, None).to_hf(
        model.state_dict()
    )
    writer = HuggingFaceStorageWriter(
        path=str(path), save_distributed=True, enable_consolidation=True
    )
    dcp.save(hf_state_dict, storage_writer=writer)
    return str(path)


def manager(model, base: Path, sd_adapter=None, **checkpoint) -> BlockwiseCheckpointManager:
    """Constructed exactly as the trainer constructs torchtitan's CheckpointManager."""
    job = JobConfig()
    config = job.checkpoint
    config.enable = True
    config.folder = "checkpoint"
    for name, value in checkpoint.items():
        setattr(config, name, value)
    parallel_dims = ParallelDims(
        dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1
    )
    optimizers = build_optimizers([model], job.optimizer, parallel_dims)
    lr_schedulers = build_lr_schedulers(optimizers, job.lr_scheduler, 10)
    return BlockwiseCheckpointManager(
        dataloader=None, model_parts=[model], optimizers=optimizers,
        lr_schedulers=lr_schedulers, states={}, checkpoint_config=config,
        sd_adapter=sd_adapter, base_folder=str(base),
        added_by_conversion=is_added_by_conversion,  # what the LM family passes
    )


def assert_started_from(model, stock: Transformer, before: dict[str, torch.Tensor]):
    """Every stock weight is the checkpoint's, every added one as it was (fresh)."""
    after = model.state_dict()
    saved = stock.state_dict()
    assert set(saved) == {k for k in after if not is_added_by_conversion(k)}
    for key, value in saved.items():
        assert torch.equal(after[key], value), key
        assert not torch.equal(before[key], value), f"{key} was already equal"
    added = [k for k in after if is_added_by_conversion(k)]
    assert added
    for key in added:
        assert torch.equal(after[key], before[key]), key
    for i in range(N_LAYERS):  # AdaLN-Zero: still zero
        assert not model.layers[str(i)].adaln.linear.weight.any()


def one_line_load_error(checkpointer) -> str:
    """The message of the ValueError that `checkpointer.load()` raises; one line."""
    with pytest.raises(ValueError) as error:
        checkpointer.load()
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def test_predicate_names_exactly_the_conversion_added_keys():
    stock_keys = set(stock_model(seed=0).state_dict())
    converted_keys = set(denoiser().state_dict())
    assert stock_keys < converted_keys
    assert {k for k in converted_keys if is_added_by_conversion(k)} == (
        converted_keys - stock_keys
    )


def test_initial_model_only_load_of_stock_dcp(tmp_path, logs):
    stock = stock_model(seed=0)
    path = save_dcp(stock.state_dict(), tmp_path / "stock")
    model = denoiser()
    before = snapshot(model)
    checkpointer = manager(model, tmp_path / "run", initial_load_path=path)

    assert checkpointer.load()

    assert_started_from(model, stock, before)
    n_added = sum(is_added_by_conversion(k) for k in before)
    line = (
        f"loaded {len(before) - n_added} weights from {path}, {n_added} new "
        "(AdaLN-Zero, sigma embedder, final AdaLN) freshly initialised"
    )
    assert [r.getMessage() for r in logs.records].count(line) == 1
    # torchtitan's ModelWrapper cache follows the loaded model (what a save writes)
    cached = checkpointer.states["model"].state_dict()
    assert all(torch.equal(cached[k], v) for k, v in model.state_dict().items())


def test_initial_load_of_another_model_shape_names_key_and_both_shapes(tmp_path):
    path = save_dcp(stock_model(seed=0, dim=128).state_dict(), tmp_path / "dim128")
    model = denoiser()
    before = snapshot(model)
    checkpointer = manager(model, tmp_path / "run", initial_load_path=path)

    message = one_line_load_error(checkpointer)
    assert f"checkpoint {path} stores tok_embeddings.weight as (2048, 128)" in message
    assert "this model has (2048, 256)" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_initial_load_missing_a_stock_key_names_it(tmp_path):
    state_dict = stock_model(seed=0).state_dict()
    del state_dict["norm.weight"]
    path = save_dcp(state_dict, tmp_path / "no_norm")
    checkpointer = manager(denoiser(), tmp_path / "run", initial_load_path=path)

    message = one_line_load_error(checkpointer)
    assert f"checkpoint {path} has no norm.weight" in message
    assert "(256,)" in message


def test_initial_load_of_a_denoiser_export_loads_its_added_modules(tmp_path, logs):
    exported = denoiser()
    with torch.no_grad():
        exported.layers["0"].adaln.linear.weight.normal_()
    path = save_dcp(exported.state_dict(), tmp_path / "denoiser")
    model = denoiser(seed=2)
    checkpointer = manager(model, tmp_path / "run", initial_load_path=path)

    assert checkpointer.load()

    for key, value in exported.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert any(r.getMessage().endswith(", 0 new (AdaLN-Zero, sigma embedder, final "
                                       "AdaLN) freshly initialised") for r in logs.records)


@pytest.mark.parametrize("where", ["seed step-0 in the run's folder", "full-state initial load"])
def test_other_loads_stay_strict(tmp_path, where):
    """Only the model-only initial load is loosened: a stock checkpoint as the run's own
    step-0 seed, or as an initial load with initial_load_model_only = false, still fails
    torchtitan's strict DCP load, and leaves the model untouched."""
    stock_state = stock_model(seed=0).state_dict()
    model = denoiser()
    before = snapshot(model)
    if where.startswith("seed"):
        save_dcp(stock_state, tmp_path / "run" / "checkpoint" / "step-0")
        checkpointer = manager(model, tmp_path / "run")
    else:
        path = save_dcp(stock_state, tmp_path / "stock")
        checkpointer = manager(
            model, tmp_path / "run", initial_load_path=path, initial_load_model_only=False
        )

    # DCP's strict error: raised as such (a BaseException) by the initial load; the
    # resume of the run's own step folder reports it as why no checkpoint can be loaded
    expected = CheckpointError if where.startswith("seed") else CheckpointException
    with pytest.raises(expected, match="Missing key in checkpoint state_dict"):
        checkpointer.load()

    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_save_and_resume_are_torchtitans(tmp_path):
    """A full checkpoint of the denoiser (model with its added keys, optimizer, lr
    scheduler) resumes exactly, through torchtitan's strict path."""
    model = denoiser()
    checkpointer = manager(
        model, tmp_path / "run", keep_latest_k=0, last_save_model_only=False
    )
    tokens = torch.randint(0, 2048, (1, 8))
    for block in range(3):  # every parameter gets optimizer state
        logits = model(tokens, tokens, block=block, sigma_B=torch.ones(1),
                       noise_BTD=torch.randn(1, 8, 256))
        logits.square().mean().backward()
    checkpointer.states["optimizer"].step()
    checkpointer.states["lr_scheduler"].step()
    saved_model = snapshot(model)
    saved_optimizer = {
        k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
        for k, v in checkpointer.states["optimizer"].state_dict().items()
    }
    assert any("exp_avg" in k for k in saved_optimizer)
    checkpointer.save(curr_step=3, last_step=True)

    resumed = denoiser(seed=2)
    resumer = manager(resumed, tmp_path / "run", keep_latest_k=0)
    assert resumer.load()

    for key, value in saved_model.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    loaded_optimizer = resumer.states["optimizer"].state_dict()
    assert loaded_optimizer.keys() == saved_optimizer.keys()
    for key, value in saved_optimizer.items():
        if torch.is_tensor(value):
            assert torch.equal(loaded_optimizer[key], value), key
        else:
            assert loaded_optimizer[key] == value, key
    assert resumer.states["lr_scheduler"].state_dict() == (
        checkpointer.states["lr_scheduler"].state_dict()
    )


@pytest.mark.parametrize("source", ["initial_load_path", "hf_assets_path"])
def test_initial_load_in_hf(tmp_path, logs, source):
    """HF Llama safetensors through the train spec's adapter (HF's rotary layout of
    wq/wk is permuted and back, exactly); the added modules stay fresh."""
    stock = stock_model(seed=0)
    path = save_hf(stock, tmp_path / "hf")
    model = denoiser()
    before = snapshot(model)
    if source == "initial_load_path":
        adapter, checkpoint = Llama3StateDictAdapter(model.model_args, None), {
            "initial_load_path": path}
    else:  # torchtitan falls back to [model] hf_assets_path
        adapter, checkpoint = Llama3StateDictAdapter(model.model_args, path), {}
    checkpointer = manager(
        model, tmp_path / "run", initial_load_in_hf=True, sd_adapter=adapter, **checkpoint
    )

    assert checkpointer.load()

    assert_started_from(model, stock, before)
    assert any(r.getMessage().startswith(f"loaded 57 weights from {path}, 18 new")
               for r in logs.records)


def test_initial_load_in_hf_of_another_model_shape(tmp_path):
    path = save_hf(stock_model(seed=0, dim=128), tmp_path / "hf128")
    model = denoiser()
    checkpointer = manager(
        model, tmp_path / "run", initial_load_path=path, initial_load_in_hf=True,
        sd_adapter=Llama3StateDictAdapter(model.model_args, None),
    )

    message = one_line_load_error(checkpointer)
    assert f"checkpoint {path} stores model.embed_tokens.weight as (2048, 128)" in message
    assert "this model has (2048, 256)" in message


def test_initial_load_of_a_deeper_model_is_refused(tmp_path):
    """An 8-layer checkpoint must not load its first layers into a 6-layer model."""
    path = save_dcp(stock_model(seed=0, n_layers=N_LAYERS + 2).state_dict(), tmp_path / "deep")
    checkpointer = manager(denoiser(), tmp_path / "run", initial_load_path=path)
    message = one_line_load_error(checkpointer)
    assert f"checkpoint {path} holds " in message and f"layers.{N_LAYERS}." in message


def test_initial_load_of_a_denoiser_into_the_end_to_end_twin_is_refused(tmp_path):
    path = save_dcp(denoiser().state_dict(), tmp_path / "denoiser")
    twin = stock_model(seed=2)
    checkpointer = manager(twin, tmp_path / "run", initial_load_path=path)
    checkpointer._initial_model_only_load = True
    message = one_line_load_error(checkpointer)
    assert "weights this model lacks" in message and "adaln" in message


def identity(enable: bool, overlap: float = 0.1, family: str | None = "dblocks_llama3") -> dict:
    saved = {"diffusion_blocks.enable": enable, "model.name": "llama3",
             "model.flavor": "debugmodel", "diffusion_blocks.overlap": overlap}
    return saved | ({"model.family": family} if family else {})


@pytest.mark.parametrize("saved, ours, loads", [
    (identity(False), identity(True), True),        # end to end -> denoiser: the stock path
    (identity(True), identity(False), False),       # a denoiser into the twin
    (identity(True, 0.2), identity(True), False),   # another partition: same shapes
    # another family with the same weights' names and shapes, end to end or not
    (identity(False, family="dblocks_md4"), identity(True), False),
    (identity(True, family="dblocks_md4"), identity(True), False),
    (identity(True, family=None), identity(True), True),  # saved before the family was
])
def test_initial_load_checks_the_saved_identity(tmp_path, saved, ours, loads):
    from diffusion_blocks.components.run_identity import write_identity

    path = save_dcp(stock_model(seed=0).state_dict(), tmp_path / "saved")
    write_identity(path, saved)
    checkpointer = manager(denoiser(), tmp_path / "run", initial_load_path=path)
    checkpointer.set_run(ours, False, None)
    if loads:
        assert checkpointer.load()
    else:
        message = one_line_load_error(checkpointer)
        assert message.startswith(f"[checkpoint] initial_load_path {path} was trained as another")


def test_initial_load_path_without_the_checkpointer_is_refused(write_toml):
    from diffusion_blocks.config.loader import parse_job_config

    path = write_toml("run.toml", (
        '[model]\nname = "dblocks_llama3"\nflavor = "debugmodel"\n'
        '[checkpoint]\nenable = false\ninitial_load_path = "somewhere"\n'
    ))
    with pytest.raises(ValueError, match=r"initial_load_path somewhere is set but \[checkpoint\] "
                                         r"enable = false"):
        parse_job_config(["--job.config_file", str(path)])
