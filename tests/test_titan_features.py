"""torchtitan features in block-wise runs (CPU): every key that turns one on acts.

Covered here: a stock torchtitan llama3 config trained block-wise through the
`diffusion_blocks` converter (HF tokenizer, stock 6-layer flavor), `[profiling]` traces,
`[training] gc_freq`, LM validation per block through torchtitan's validator,
torchtitan's metrics processor, `[checkpoint] initial_load_path` from a stock llama3
checkpoint and `initial_load_in_hf` from Hugging Face safetensors, the float8 converter
and its post-optimizer hook, autocast on one device, seed checkpoints, `[training]
max_norm`, `[comm]` (fake backend) and the run_train.sh launcher. Multi-step runs go
through torchrun in subprocesses; single-step checks build the trainer in this process.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import _train_helpers as h
from diffusion_blocks import train
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import synthetic_sentences
from diffusion_blocks.errors import ConfigError

REPO = h.REPO
STOCK_TOML = REPO / "train_configs" / "llama3_torchtitan_debug.toml"
STOCK_DBLOCKS_TOML = REPO / "train_configs" / "llama3_torchtitan_debug_dblocks.toml"
TRAIN_ROW = "loss_metrics/global_avg_loss"
SMALL = ["--training.seq_len", "32", "--training.local_batch_size", "2",
         "--training.dataset", "synthetic_text"]


def write_hf_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer.json trained on the generated corpus."""
    from tokenizers import decoders, models, pre_tokenizers, Tokenizer, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(synthetic_sentences(2000), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"})
    )
    return folder


def rows(folder: Path) -> list[dict]:
    return h.read_jsonl(folder / "metrics.jsonl")


def training_rows(folder: Path) -> list[dict]:
    return [r for r in rows(folder) if TRAIN_ROW in r]


# ---------------------------------------------------------------------------
# One stock-config run, block-wise, with validation, profiling, GC and TensorBoard


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("hf_tokenizer"))


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("stock_dblocks")
    proc = h.torchrun([
        "--job.config_file", str(STOCK_DBLOCKS_TOML), *SMALL,
        "--model.hf_assets_path", str(tokenizer_dir),
        "--training.steps", "4", "--job.dump_folder", str(folder),
        "--metrics.enable_tensorboard",
        "--validation.enable", "--validation.dataset", "synthetic_text",
        "--validation.freq", "2", "--validation.steps", "2",
        "--validation.seq_len", "32", "--validation.local_batch_size", "2",
        "--profiling.enable_profiling", "--profiling.profile_freq", "2",
        "--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1",
        "--training.gc_freq", "2",
    ], timeout=300)
    h.check_ok(proc)
    return {"folder": folder, "output": h.output_of(proc)}


def test_stock_llama3_config_trains_blockwise_through_the_converter(stock_run):
    out = stock_run["output"]
    # the stock 6-layer flavor, converted on meta, cut into 3 blocks of 2 layers
    assert "Converted the llama3 Transformer to the DiffusionBlocks denoiser: 3 blocks of [2, 2, 2] layers" in out
    assert "llama3 debugmodel as DiffusionBlocksLlama: DiffusionBlocks B=3" in out
    assert "Loading tokenizer from tokenizer.json" in out  # the stock spec's HF tokenizer
    steps = training_rows(stock_run["folder"])
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert math.isfinite(r[TRAIN_ROW]) and 0 <= r["diffusion_blocks/block"] < 3
    assert "Training done: steps per block" in out


def test_num_blocks_must_split_the_stock_layer_count(tmp_path, tokenizer_dir):
    proc = h.torchrun([
        "--job.config_file", str(STOCK_DBLOCKS_TOML), *SMALL,
        "--model.hf_assets_path", str(tokenizer_dir), "--diffusion_blocks.num_blocks", "4",
        "--job.dump_folder", str(tmp_path),
    ], timeout=120)
    assert proc.returncode != 0
    out = h.output_of(proc)
    assert ("num_blocks = 4 does not split the model's 6 layers equally; "
            "use one of [1, 2, 3, 6]") in out
    assert "Traceback (most recent call last)" not in proc.stdout


def test_profiling_writes_traces_on_the_configured_steps(stock_run):
    traces = stock_run["folder"] / "profile_trace"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_2", "iteration_4"]
    trace = json.loads((traces / "iteration_2" / "rank0_trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)


def test_gc_freq_collects_on_its_steps(stock_run):
    # torchtitan's GarbageCollection: collects at steps 2 and 4 with gc_freq = 2
    assert stock_run["output"].count("[GC] Performing periodic GC collection") == 2


def test_lm_validation_scores_every_block_on_held_out_batches(stock_run):
    validation = [r for r in rows(stock_run["folder"]) if "validation_metrics/loss" in r]
    assert [r["step"] for r in validation] == [1, 2, 4]  # torchtitan's should_validate
    for r in validation:
        losses = [r[f"validation_metrics/block{b}/loss"] for b in range(3)]
        ces = [r[f"validation_metrics/block{b}/ce"] for b in range(3)]
        assert all(math.isfinite(x) and x > 0 for x in losses + ces)
        # the whole model's objective: the mean over equi-probable blocks
        assert r["validation_metrics/loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
        assert r["validation_metrics/ce"] == pytest.approx(sum(ces) / 3, rel=1e-6)
        # w(sigma) grows as sigma falls: the lowest-noise block has the largest weight
        assert losses[2] > losses[0]


def test_metrics_processor_figures_and_tensorboard_tags(stock_run):
    for r in training_rows(stock_run["folder"]):
        assert r["throughput(tps)"] > 0 and r["tflops"] > 0
        assert r["time_metrics/data_loading(s)"] >= 0 and r["time_metrics/end_to_end(s)"] > 0
        assert r["memory/max_reserved(GiB)"] > 0  # the process's peak RSS on the CPU
        assert r["mfu(%)"] is None  # no peak-FLOPS figure for a CPU
        assert r["n_tokens_seen"] == 64 * r["step"]
        assert [r[f"diffusion_blocks/steps_block{b}"] for b in range(3)] and r["diffusion_blocks/ce"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in (stock_run["folder"] / "tb").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for tag in ("loss_metrics/global_avg_loss", "throughput(tps)", "tflops",
                "diffusion_blocks/block", "diffusion_blocks/sigma_mean",
                "diffusion_blocks/steps_block0", "diffusion_blocks/running_ce_block0",
                "validation_metrics/loss", "validation_metrics/block2/ce"):
        assert tag in tags, sorted(tags)


# ---------------------------------------------------------------------------
# Trainers in this process (one gloo group of size 1 for the module)


@pytest.fixture
def make_trainer(process_group, tmp_path):
    trainers = []

    def make(*args: str, config: Path = h.DEBUG_TOML) -> train.BlockwiseTrainer:
        folder = tmp_path / f"trainer{len(trainers)}"
        job_config = parse_job_config([
            *h.CPU, "--job.config_file", str(config), *h.TINY, "--training.steps", "10",
            "--job.dump_folder", str(folder), "--checkpoint.no_enable",
            "--metrics.no_enable_tensorboard", *args,
        ])
        trainer = train.BlockwiseTrainer(job_config)
        trainers.append(trainer)
        return trainer

    yield make
    for trainer in trainers:
        trainer.close()


def steps(trainer, n: int) -> None:
    data = trainer.batch_generator(trainer.dataloader)
    for _ in range(n):
        trainer.step += 1
        trainer.train_step(data)


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory, tokenizer_dir):
    """A stock llama3 (converter off: the stock Transformer) trained 3 steps, saved
    model-only as torchtitan saves a last step."""
    folder = tmp_path_factory.mktemp("stock_llama3")
    proc = h.torchrun([
        "--job.config_file", str(STOCK_DBLOCKS_TOML), *SMALL,
        "--model.hf_assets_path", str(tokenizer_dir), "--diffusion_blocks.no_enable",
        "--training.steps", "3", "--job.dump_folder", str(folder),
        "--checkpoint.enable", "--checkpoint.interval", "3", "--checkpoint.last_save_model_only",
    ], timeout=300)
    h.check_ok(proc)
    assert "llama3 debugmodel as Transformer: end-to-end" in h.output_of(proc)
    step_folder = folder / "checkpoint" / "step-3"
    state = {k: m.size for k, m in dcp.FileSystemReader(str(step_folder)).read_metadata()
             .state_dict_metadata.items()}
    assert "tok_embeddings.weight" in state and not any("adaln" in k for k in state)
    return step_folder


def load_stock_weights(step_folder: Path) -> dict[str, torch.Tensor]:
    from torchtitan.models.llama3 import llama3_args, Transformer
    import copy

    args = copy.deepcopy(llama3_args["debugmodel"])
    args.max_seq_len = 32
    stock = Transformer(args)
    state = stock.state_dict()
    dcp.load(state, checkpoint_id=str(step_folder))
    return state


def assert_started_from_stock(trainer, stock: dict[str, torch.Tensor]) -> None:
    from diffusion_blocks.models.llama3.model import is_added_by_conversion

    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.checkpointer.load()
    after = trainer.model.state_dict()
    assert set(stock) < set(after)
    for key, value in after.items():
        if is_added_by_conversion(key):
            assert torch.equal(value, before[key]), f"{key} was not left fresh"
        else:
            assert torch.equal(value, stock[key]), f"{key} differs from the stock weight"
            assert not torch.equal(value, before[key]) or "norm" in key, key
    # AdaLN-Zero starts every layer as the identity on the stock weights
    assert all(not torch.any(after[k]) for k in after if ".adaln." in k)


def test_stock_checkpoint_starts_a_blockwise_run(make_trainer, stock_checkpoint, tokenizer_dir):
    trainer = make_trainer(
        *SMALL, "--model.hf_assets_path", str(tokenizer_dir), "--checkpoint.enable",
        "--checkpoint.initial_load_path", str(stock_checkpoint), config=STOCK_DBLOCKS_TOML,
    )
    assert type(trainer.model).__name__ == "DiffusionBlocksLlama"
    assert_started_from_stock(trainer, load_stock_weights(stock_checkpoint))
    steps(trainer, 2)  # and it trains from there
    assert sum(trainer.block_stats.steps) == 2


def test_hf_checkpoint_starts_a_blockwise_run(make_trainer, stock_checkpoint, tokenizer_dir, tmp_path):
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter

    stock = load_stock_weights(stock_checkpoint)
    hf_folder = tmp_path / "hf"
    adapter = Llama3StateDictAdapter(llama3_args["debugmodel"], None)
    hf_state = adapter.to_hf(stock)
    dcp.save(hf_state, storage_writer=HuggingFaceStorageWriter(
        path=str(hf_folder), save_distributed=True, enable_consolidation=True,
        fqn_to_index_mapping={k: 1 for k in hf_state},
    ))
    trainer = make_trainer(
        *SMALL, "--model.hf_assets_path", str(tokenizer_dir), "--checkpoint.enable",
        "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(hf_folder),
        config=STOCK_DBLOCKS_TOML,
    )
    assert_started_from_stock(trainer, stock)


def test_checkpoint_of_another_shape_is_refused(make_trainer, stock_checkpoint, tokenizer_dir):
    trainer = make_trainer(  # 8 layers; the stock checkpoint has 6
        "--model.flavor", "debugmodel_8l", "--checkpoint.enable",
        "--checkpoint.initial_load_path", str(stock_checkpoint),
    )
    with pytest.raises(ConfigError, match=r"has no layers\.6\..*this model has"):
        trainer.checkpointer.load()


def test_float8_converter_and_its_post_optimizer_hook(make_trainer, write_toml, monkeypatch):
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear
    from torchtitan.components.quantization.float8 import Float8LinearConverter

    calls = []
    original = Float8LinearConverter.post_optimizer_hook
    monkeypatch.setattr(Float8LinearConverter, "post_optimizer_hook",
                        lambda self, model: calls.append(1) or original(self, model))
    config = write_toml("float8.toml", f'extends = "{h.DEBUG_TOML}"\n'
                        '[model]\nconverters = ["quantize.linear.float8"]\n'
                        '[quantize.linear.float8]\nemulate = true\n')
    trainer = make_trainer(config=config)
    linears = [m for m in trainer.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Float8Linear) for m in linears)
    steps(trainer, 2)
    assert len(calls) == 2  # torchtitan's hook, after every optimizer step
    assert all(math.isfinite(v) for v in trainer.block_stats.running_ce if not math.isnan(v))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_autocast_on_one_device(make_trainer, dtype):
    trainer = make_trainer("--training.mixed_precision_param", dtype)
    seen = []
    trainer.model.output.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    steps(trainer, 1)
    assert seen == [getattr(torch, dtype)]


def test_max_norm_is_the_clipping_key(make_trainer):
    trainer = make_trainer("--training.max_norm", "0.001", "--optimizer.lr", "0")
    norms = []
    original = trainer.clip_gradients
    trainer.clip_gradients = lambda: norms.append(original()) or norms[-1]
    steps(trainer, 1)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norms[0]) > 0.01  # the reported norm is before clipping
    assert float(clipped) == pytest.approx(0.001, rel=1e-3)


def test_non_finite_gradient_norm_stops_before_the_optimizer_steps(make_trainer):
    trainer = make_trainer("--diffusion_blocks.block_schedule", "round_robin")
    steps(trainer, 1)
    with torch.no_grad():
        trainer.model.norm.weight.fill_(float("nan"))  # every block's output is NaN now
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n != "norm.weight"}
    (optimizer,) = list(trainer.optimizers)
    counts = [float(s["step"]) for s in optimizer.state.values()]
    with pytest.raises(FloatingPointError, match=(
        r"^step 2: the loss is nan and the gradient norm is nan on block 1 \(layers 2-3, "
    )):
        steps(trainer, 1)
    assert [float(s["step"]) for s in optimizer.state.values()] == counts
    for name, p in trainer.model.named_parameters():
        if name != "norm.weight":
            assert torch.equal(p.detach(), params[name]), f"{name} was stepped"


def test_the_old_clipping_key_points_to_max_norm(write_toml):
    config = write_toml("old.toml", f'extends = "{h.DEBUG_TOML}"\n[diffusion_blocks]\nmax_grad_norm = 0.5\n')
    with pytest.raises(ConfigError, match=r"old.toml: 'diffusion_blocks.max_grad_norm' is gone.*\[training\] max_norm"):
        parse_job_config(["--job.config_file", str(config)])
    with pytest.raises(ConfigError, match=r"command line \(--diffusion_blocks.max_grad_norm\).*max_norm"):
        parse_job_config(["--job.config_file", str(h.DEBUG_TOML), "--diffusion_blocks.max_grad_norm", "0.5"])


def test_memory_snapshot_is_refused_on_the_cpu(process_group, tmp_path):
    job_config = parse_job_config([
        *h.CPU, "--job.config_file", str(h.DEBUG_TOML), "--job.dump_folder", str(tmp_path),
        "--profiling.enable_memory_snapshot",
    ])
    with pytest.raises(ConfigError, match="enable_memory_snapshot records the CUDA"):
        train.BlockwiseTrainer(job_config)


def test_end_to_end_twin_validates_with_torchtitans_plain_loss(make_trainer):
    trainer = make_trainer(
        "--diffusion_blocks.no_enable", "--validation.enable", "--validation.dataset",
        "synthetic_text", "--validation.steps", "2", "--validation.seq_len", "32",
        "--validation.local_batch_size", "2",
    )
    trainer.validator.validate(trainer.model_parts, 1)
    (row,) = [r for r in rows(Path(trainer.job_config.job.dump_folder))
              if "validation_metrics/loss" in r]
    assert 0 < row["validation_metrics/loss"] < 10  # next-token CE of an untrained model
    assert not any("block" in k for k in row)


# ---------------------------------------------------------------------------
# Launch paths: seed checkpoints, [comm], run_train.sh


def test_seed_checkpoint_then_training_from_it(tmp_path):
    args = ["--job.config_file", str(h.DEBUG_TOML), *h.TINY, "--job.dump_folder", str(tmp_path),
            "--metrics.no_enable_tensorboard"]
    h.check_ok(h.torchrun([*args, "--checkpoint.create_seed_checkpoint"], timeout=180))
    assert (tmp_path / "checkpoint" / "step-0" / ".metadata").is_file()
    proc = h.torchrun([*args, "--training.steps", "2", "--checkpoint.interval", "10"], timeout=180)
    h.check_ok(proc)
    out = h.output_of(proc)
    assert "Loading the checkpoint from" in out and "step-0" in out
    assert "Training starts at step 1" in out


def test_seed_checkpoint_needs_one_process(tmp_path):
    proc = h.torchrun(["--job.config_file", str(h.DEBUG_TOML), *h.TINY, "--job.dump_folder",
                       str(tmp_path), "--checkpoint.create_seed_checkpoint"], nproc=2, timeout=180)
    assert proc.returncode != 0
    assert "a seed checkpoint is written by ONE process" in h.output_of(proc)


def run_script(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """tools/run_train.sh (its torchrun binds port 0 itself), on the CPU."""
    return subprocess.run(
        ["bash", str(REPO / "tools" / "run_train.sh"), *args, *h.CPU], cwd=REPO,
        env={**h.subprocess_env(), **env}, capture_output=True, text=True, timeout=timeout,
    )


def test_comm_fake_backend_runs_the_configured_world_size_in_one_process(tmp_path):
    proc = run_script({"NGPU": "2", "COMM_MODE": "fake_backend", "CONFIG_FILE": str(h.DEBUG_TOML)},
                      *h.TINY, "--job.dump_folder", str(tmp_path), "--checkpoint.no_enable")
    h.check_ok(proc)
    out = h.output_of(proc)
    assert "world size 2" in out and "Training done" in out


def test_run_train_sh_with_torchtitans_train_file_variable(tmp_path):
    proc = run_script({"NGPU": "1", "TRAIN_FILE": "diffusion_blocks.train",
                       "CONFIG_FILE": str(h.DEBUG_TOML)},
                      *h.TINY, "--training.steps", "2", "--job.dump_folder", str(tmp_path),
                      "--checkpoint.no_enable", "--metrics.no_enable_tensorboard")
    h.check_ok(proc)
    assert [r["step"] for r in training_rows(tmp_path)] == [1, 2]


# ---------------------------------------------------------------------------
# Model args: torchtitan's Trainer logs json.dumps(asdict(model_args))


@pytest.mark.parametrize("config", ["llama3_debug.toml", "llama3_torchtitan_debug_dblocks.toml",
                                    "vit_digits.toml", "dit_digits.toml"])
def test_model_args_are_json_serialisable(config):
    import dataclasses

    from diffusion_blocks.registry import resolve_run_spec

    job_config = parse_job_config(["--job.config_file", str(REPO / "train_configs" / config)])
    args = resolve_run_spec(job_config).spec.model_args[job_config.model.flavor]
    args.update_from_config(job_config)
    text = json.dumps(dataclasses.asdict(args))
    assert json.loads(text)["n_layers"] == args.n_layers
