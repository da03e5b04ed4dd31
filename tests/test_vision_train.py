"""The vision models through the ONE train loop (diffusion_blocks.train), in
subprocesses: 2-process gloo FSDP runs of both denoisers, 1-process runs of both
end-to-end twins and of a ViT trained well above chance, then the tools on the
checkpoints they wrote."""

import json
import subprocess
import sys

import pytest

import _train_helpers as h
from _train_helpers import BLOCK, CE, LOSS, MSE, training_rows
from conftest import REPO

TINY = [
    "--training.steps", "4", "--training.local_batch_size", "16",
    "--metrics.log_freq", "1", "--validation.freq", "2", "--validation.local_batch_size", "128",
    "--checkpoint.interval", "2",
]
# the DiT's image sampler (validation samples); the ViT does not read the key and refuses it
DIT_TINY = ["--diffusion_blocks.sampling_steps", "4"]


def train(config, folder, nproc, *extra, tiny=TINY):
    """torchrun (race-free rendezvous) of the trainer on the CPU; returns its output."""
    family_tiny = DIT_TINY if config.startswith("dit") else []
    proc = h.torchrun([
        "--job.config_file", str(REPO / "train_configs" / config),
        "--job.dump_folder", str(folder), *tiny, *family_tiny, *extra,
    ], nproc=nproc)
    h.check_ok(proc)
    return h.output_of(proc)


def tool(name, *args):
    """A tool in a subprocess (classify.py and sample_images.py run on `--device cpu`,
    their default)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / name), *args],
        capture_output=True, text=True, cwd=REPO, env=h.subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (folder / "tb").iterdir()
    accumulator = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator.Tags()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    log = train("vit_digits.toml", folder, 2, "--compile.enable", "--compile.backend", "aot_eager")
    return folder, log


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit")
    return folder, train("dit_digits.toml", folder, 2)


def test_vit_two_process_run_trains_blocks_logs_accuracy_and_checkpoints(vit_run):
    folder, log = vit_run
    assert "world size 2" in log and "DiffusionBlocks B=2" in log
    rows = records(folder)
    steps = training_rows(folder / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r[BLOCK] in (0, 1) for r in steps)
    assert all(CE in r for r in steps)
    evals = [r for r in rows if "eval/test_accuracy" in r]
    # torchtitan's validation steps: step 1 and every [validation] freq (2) steps
    assert [r["step"] for r in evals] == [1, 2, 4] and all(0 <= r["eval/test_accuracy"] <= 1 for r in evals)
    assert (folder / "checkpoint" / "step-2" / ".metadata").is_file()
    assert (folder / "checkpoint" / "step-4" / ".metadata").is_file()
    assert "eval/test_accuracy" in tensorboard_tags(folder)["scalars"]


def test_classify_tool_reads_a_checkpoint_written_by_two_ranks(vit_run):
    # a smoke test of the resharding load (2 FSDP shards into one process); whether the
    # tool really uses the loaded weights is the next test's job
    folder, _ = vit_run
    config = str(REPO / "train_configs" / "vit_digits.toml")
    out = json.loads(tool("classify.py", "--job.config_file", config, "--checkpoint", str(folder / "checkpoint"), "--json"))
    assert out["num_examples"] == 359 and 0.0 <= out["accuracy"] <= 1.0


# One process, trained until well above chance (10 classes): the loop's evaluation then
# sees exactly what the tool sees (one shard, the same seed and batch size), so the two
# accuracies must be equal, and a fresh (or not loaded) model could not reach it.
TRAINED_STEPS = 300
TRAINED = [
    "--training.steps", str(TRAINED_STEPS), "--training.local_batch_size", "64",
    "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "10",
    "--diffusion_blocks.block_schedule", "round_robin",
    "--metrics.log_freq", "100", "--metrics.no_enable_tensorboard",
    "--validation.freq", str(TRAINED_STEPS), "--validation.local_batch_size", "128",
    "--checkpoint.interval", str(TRAINED_STEPS),
]


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_trained")
    train("vit_digits.toml", folder, 1, tiny=TRAINED)
    return folder


def test_classify_tool_reproduces_the_loops_accuracy_of_the_checkpoint(trained_vit):
    evals = {r["step"]: r["eval/test_accuracy"] for r in records(trained_vit) if "eval/test_accuracy" in r}
    assert sorted(evals) == [1, TRAINED_STEPS]
    # the loop's own figures: at chance before training, well above it after
    assert evals[1] < 0.2 and evals[TRAINED_STEPS] > 0.35, evals
    out = json.loads(tool(
        "classify.py", "--job.config_file", str(REPO / "train_configs" / "vit_digits.toml"),
        "--checkpoint", str(trained_vit / "checkpoint"), "--json", "--batch-size", "128",
    ))
    assert out["num_examples"] == 359
    # the same weights, examples, batches and sampling seed: the same correct count
    assert round(out["accuracy"] * 359) == round(evals[TRAINED_STEPS] * 359), (out, evals)


def test_dit_two_process_run_writes_a_sample_grid(dit_run):
    folder, log = dit_run
    assert "world size 2" in log
    # a grid at each of torchtitan's validation steps (1 and every 2)
    assert sorted(p.name for p in (folder / "samples").iterdir()) == [
        "step-1.png", "step-2.png", "step-4.png"]
    assert "eval/samples" in tensorboard_tags(folder)["images"]
    steps = training_rows(folder / "metrics.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r[BLOCK] in (0, 1) for r in steps)
    assert all(MSE in r for r in steps)


def test_sample_images_tool_writes_one_row_per_class(dit_run, tmp_path):
    from PIL import Image

    folder, _ = dit_run
    out = tmp_path / "grid.png"
    tool("sample_images.py", "--job.config_file", str(REPO / "train_configs" / "dit_digits.toml"),
         "--checkpoint", str(folder / "checkpoint" / "step-4"), "--steps", "3", "--cfg-scale", "1.5",
         "--per-class", "2", "--classes", "0,1,2", "--scale", "2", "--out", str(out))
    width, height = Image.open(out).size
    assert (width, height) == (2 * 17 + 1, 3 * 17 + 1)  # 2 columns x 3 rows of 16+1 px


@pytest.mark.parametrize("config", ["vit_digits_e2e.toml", "dit_digits_e2e.toml"])
def test_end_to_end_twins_train_in_the_same_loop(config, tmp_path):
    log = train(config, tmp_path, 1)
    assert "end-to-end (diffusion_blocks disabled)" in log
    rows = records(tmp_path)
    assert [r["step"] for r in rows if LOSS in r] == [1, 2, 3, 4]
    assert all(BLOCK not in r for r in rows)
    if config.startswith("vit"):
        out = json.loads(tool("classify.py", "--job.config_file", str(REPO / "train_configs" / config),
                              "--checkpoint", str(tmp_path / "checkpoint"), "--json"))
        assert out["num_examples"] == 359
    else:
        assert (tmp_path / "samples" / "step-4.png").is_file()
