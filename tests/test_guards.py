"""Nothing silently wrong (CPU): non-finite steps, checkpoint saves and resumes, run
identity, the metrics.jsonl resume marker and gradient accumulation.

The trainers are built in this process (one gloo process group of size 1 for the
module) on the tiny debug model; the multi-rank resumes are in test_train_loop.py and
test_block_parallel.py, one inference tool runs as a subprocess.
"""

import errno
import gc
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import _train_helpers as h
from diffusion_blocks import train
from diffusion_blocks.components.run_identity import IDENTITY_FILE
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import CheckpointError, ConfigError
from diffusion_blocks.inference import load_for_inference, load_model

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

QUIET = ["--metrics.no_enable_tensorboard", "--debug.seed", "0",
         "--diffusion_blocks.block_schedule", "round_robin"]


def args_for(dump: Path, steps: int, *extra: str) -> list[str]:
    return ["--job.config_file", str(h.DEBUG_TOML), *h.TINY, *QUIET,
            "--training.steps", str(steps), "--job.dump_folder", str(dump), *extra]


@pytest.fixture
def make_trainer(process_group):
    def build(dump: Path, steps: int, *extra: str) -> train.BlockwiseTrainer:
        return train.BlockwiseTrainer(parse_job_config(args_for(dump, steps, *extra)))

    with h.closing_trainers(build) as make:
        yield make


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog


def messages(logs) -> str:
    return "\n".join(r.getMessage() for r in logs.records)


def nan_gradients_at(trainer, steps: set[int]) -> None:
    """The token embedding (trained at every step) gets a NaN gradient at `steps`."""
    weight = trainer.model.tok_embeddings.weight
    weight.register_hook(
        lambda grad: torch.full_like(grad, math.nan) if trainer.step in steps else grad
    )


def all_finite(trainer) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def block_description(trainer, block: int) -> str:
    layers = trainer.partition.layer_ranges[block]
    lo, hi = trainer.partition.training_interval(block)
    return (f"block {block} (layers {layers.start}-{layers.stop - 1}, "
            f"sigma in [{lo:.4g}, {hi:.4g}])")


def saved_steps(dump: Path) -> list[str]:
    folder = dump / "checkpoint"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------
# 1. A step is committed only if it is finite


def test_nan_gradient_stops_before_the_optimizer_step_and_nothing_is_saved(
    make_trainer, tmp_path
):
    trainer = make_trainer(tmp_path, 3, "--checkpoint.interval", "1")
    nan_gradients_at(trainer, {2})
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    message = str(error.value)
    # round robin: step 2 trains block 1; the loss is finite, the gradient norm is not
    assert message.startswith(
        f"step 2: the gradient norm is nan on {block_description(trainer, 1)}: stopped"
    ), message
    assert "\n" not in message
    assert trainer.step == 2 and all_finite(trainer)  # the optimizer did not step
    assert saved_steps(tmp_path) == ["step-1"]


def test_non_finite_loss_with_finite_gradients_stops(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, 3, "--checkpoint.no_enable")
    forward_backward = trainer.forward_backward_step

    def infinite_loss(**kwargs):  # backward ran on the finite loss: gradients finite
        loss = forward_backward(**kwargs)
        return loss + math.inf if trainer.step == 2 else loss

    trainer.forward_backward_step = infinite_loss
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    assert str(error.value).startswith(
        f"step 2: the loss is inf on {block_description(trainer, 1)}: stopped")
    assert trainer.lr_schedulers.schedulers[0].last_epoch == 1  # step 2 did not step


def test_skip_mode_skips_non_finite_steps_then_stops_past_the_bound(make_trainer, tmp_path):
    skip = ["--checkpoint.no_enable", "--diffusion_blocks.on_nonfinite", "skip",
            "--diffusion_blocks.max_nonfinite_skips", "2"]
    trainer = make_trainer(tmp_path / "skips", 5, *skip)
    nan_gradients_at(trainer, {2, 3})
    trainer.train()

    assert trainer.step == 5 and trainer.nonfinite_skips == 2 and all_finite(trainer)
    # neither the optimizer nor the LR schedule stepped at the skipped steps
    assert trainer.lr_schedulers.schedulers[0].last_epoch == 3
    (optimizer,) = list(trainer.optimizers)
    assert float(optimizer.state[trainer.model.tok_embeddings.weight]["step"]) == 3
    metrics = tmp_path / "skips" / "metrics.jsonl"
    assert [r["step"] for r in h.training_rows(metrics)] == [1, 4, 5]
    events = h.event_rows(metrics)
    assert [(r["step"], r["event"], r["skips"]) for r in events] == [
        (2, "nonfinite_skip", 1), (3, "nonfinite_skip", 2)]
    assert events[0]["problem"].startswith("step 2: the gradient norm is nan on block 1")
    # round robin trains blocks 0, 1, 2, 3, 0: the skipped steps (blocks 1, 2) do not count
    assert trainer.block_stats.steps == [2, 0, 0, 1]

    bounded = make_trainer(tmp_path / "bound", 5, *skip[:-1], "1")
    nan_gradients_at(bounded, {2, 3})
    with pytest.raises(FloatingPointError, match=(
        "step 3: the gradient norm is nan on block 2 .*: stopped, that is 2 non-finite "
        r"steps in this run, more than \[diffusion_blocks\] max_nonfinite_skips = 1"
    )):
        bounded.train()
    assert bounded.step == 3 and all_finite(bounded)


def test_a_save_of_non_finite_weights_is_refused(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, 3, "--checkpoint.interval", "1")
    with torch.no_grad():
        trainer.model.norm.weight[0] = math.nan
    with pytest.raises(FloatingPointError, match=(
        f"refusing to save checkpoint {tmp_path / 'checkpoint' / 'step-1'}: norm.weight "
        "hold non-finite values"
    )):
        trainer.checkpointer.save(curr_step=1)
    assert not (tmp_path / "checkpoint" / "step-1").exists()


# ---------------------------------------------------------------------------
# 2. Saves that fail


def failing_writer(monkeypatch, code: int) -> None:
    def write_data(self, plan, planner):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)


def test_a_full_disk_stops_the_save_naming_folder_and_cause(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, 3, "--checkpoint.interval", "1")
    failing_writer(monkeypatch, errno.ENOSPC)
    with pytest.raises(CheckpointError) as error:
        trainer.checkpointer.save(curr_step=1)
    folder = tmp_path / "checkpoint" / "step-1"
    assert str(error.value).startswith(
        f"cannot save checkpoint {folder}: no space left on device (errno 28)")
    assert not (folder / ".metadata").exists()


def test_too_little_free_space_stops_before_the_save_writes(make_trainer, tmp_path, monkeypatch):
    """Whatever layer would fail mid-write, the save is refused before it starts."""
    from collections import namedtuple

    from diffusion_blocks.components import checkpoint as checkpoint_module

    trainer = make_trainer(tmp_path, 3, "--checkpoint.interval", "1")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(CheckpointError) as error:
        trainer.checkpointer.save(curr_step=1)
    folder = tmp_path / "checkpoint" / "step-1"
    assert str(error.value).startswith(
        f"cannot save checkpoint {folder}: no space left on device (1000 bytes free")
    assert not folder.exists()


def test_a_failed_async_save_is_logged_and_raised_at_the_next_save(
    make_trainer, tmp_path, monkeypatch, logs
):
    trainer = make_trainer(tmp_path, 3, "--checkpoint.interval", "1",
                           "--checkpoint.async_mode", "async")
    failing_writer(monkeypatch, errno.EACCES)
    trainer.checkpointer.save(curr_step=1)  # returns once staged
    folder = tmp_path / "checkpoint" / "step-1"
    with pytest.raises(CheckpointError, match=(
        f"^cannot save checkpoint {folder}: permission denied"
    )):
        trainer.checkpointer.save(curr_step=2)
    assert f"async checkpoint save of {folder} failed: permission denied" in messages(logs)


# ---------------------------------------------------------------------------
# 3. Resume: fall back past broken checkpoints, never start over silently


@pytest.fixture(scope="module")
def two_checkpoints(process_group, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each (step-1, step-2)."""
    dump = tmp_path_factory.mktemp("run")
    trainer = train.BlockwiseTrainer(
        parse_job_config(args_for(dump, 2, "--checkpoint.interval", "1"))
    )
    try:
        trainer.train()
    finally:
        trainer.close()
        gc.enable()
    assert saved_steps(dump) == ["step-1", "step-2"]
    return dump


def copy_run(source: Path, dump: Path) -> Path:
    shutil.copytree(source / "checkpoint", dump / "checkpoint")
    shutil.copy(source / "metrics.jsonl", dump / "metrics.jsonl")
    return dump / "checkpoint"


def remove_metadata(step: Path) -> None:
    (step / ".metadata").unlink()


def truncate_shard(step: Path) -> None:
    shard = step / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)


def corrupt_shard(step: Path) -> None:
    with open(step / "__0_0.distcp", "r+b") as f:
        f.write(b"\0" * 4096)


DAMAGE = {
    "no .metadata": (remove_metadata, "no .metadata: its save did not finish"),
    "truncated shard": (truncate_shard, "shard __0_0.distcp is truncated"),
    "corrupt shard": (corrupt_shard, "loading it failed: UnpicklingError"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_a_broken_newest_checkpoint(
    two_checkpoints, make_trainer, tmp_path, logs, damage
):
    damage_fn, reported = DAMAGE[damage]
    checkpoints = copy_run(two_checkpoints, tmp_path)
    damage_fn(checkpoints / "step-2")
    trainer = make_trainer(tmp_path, 4)

    assert trainer.checkpointer.load() and trainer.step == 1
    log = messages(logs)
    assert f"Checkpoint {checkpoints / 'step-2'} cannot be resumed from: {reported}" in log
    assert f"Resumed from {checkpoints / 'step-1'}, the newest usable checkpoint" in log
    # metrics.jsonl: the killed run's step-2 row is dropped, a marker says where we are
    rows = h.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1]
    assert rows[1] == {"step": 1, "event": "resume", "checkpoint": str(checkpoints / "step-1"),
                       "dropped_rows": 1}


def test_no_usable_checkpoint_stops_unless_a_fresh_start_is_allowed(
    two_checkpoints, make_trainer, tmp_path, logs
):
    checkpoints = copy_run(two_checkpoints, tmp_path)
    remove_metadata(checkpoints / "step-2")
    truncate_shard(checkpoints / "step-1")
    trainer = make_trainer(tmp_path, 4)
    with pytest.raises(CheckpointError) as error:
        trainer.checkpointer.load()
    assert str(error.value).startswith(
        f"{checkpoints} holds checkpoints but none can be resumed from (step-2: no "
        ".metadata: its save did not finish; step-1: shard __0_0.distcp is truncated"
    )
    assert "[checkpoint] allow_fresh_start = true" in str(error.value)
    assert trainer.step == 0

    fresh = make_trainer(tmp_path, 4, "--checkpoint.allow_fresh_start")
    assert fresh.checkpointer.load() is False and fresh.step == 0
    assert "starting at step 1 because [checkpoint] allow_fresh_start = true" in messages(logs)
    assert h.read_jsonl(tmp_path / "metrics.jsonl")[-1] == {
        "step": 0, "event": "fresh_start", "dropped_rows": 2}


def test_resume_with_another_noise_setting_names_key_and_both_values(
    two_checkpoints, make_trainer, tmp_path
):
    checkpoints = copy_run(two_checkpoints, tmp_path)
    trainer = make_trainer(tmp_path, 4, "--diffusion_blocks.sigma_max", "40")
    with pytest.raises(ConfigError, match=(
        f"^checkpoint {checkpoints / 'step-2'} was trained with other settings: "
        r"\[diffusion_blocks\] sigma_max = 80.0 in the checkpoint, 40.0 here\. "
    )):
        trainer.checkpointer.load()
    assert trainer.step == 0


@pytest.mark.parametrize("steps", [1, 2])
def test_training_steps_at_or_below_the_resumed_step_names_both(
    two_checkpoints, make_trainer, tmp_path, steps
):
    checkpoints = copy_run(two_checkpoints, tmp_path)
    trainer = make_trainer(tmp_path, steps)
    with pytest.raises(ConfigError, match=(
        rf"^\[training\] steps = {steps} is at or below step 2, which this run resumes "
        rf"from \({checkpoints / 'step-2'}\): .*--training.steps above 2"
    )):
        trainer.checkpointer.load()


def test_a_model_only_last_save_says_how_to_train_on(make_trainer, tmp_path):
    first = make_trainer(tmp_path, 1, "--checkpoint.last_save_model_only")
    first.checkpointer.save(curr_step=1, last_step=True)
    step = tmp_path / "checkpoint" / "step-1"
    trainer = make_trainer(tmp_path, 3)
    with pytest.raises(ConfigError) as raised:
        trainer.checkpointer.load()
    message = str(raised.value)
    assert "model-only save" in message and "move them" not in message
    assert f'new [job] dump_folder with [checkpoint] initial_load_path = "{step}"' in message


# ---------------------------------------------------------------------------
# 4. Inference tools check what they load


MISMATCHES = {
    "num_blocks": (["--diffusion_blocks.num_blocks", "2"],
                   "[diffusion_blocks] num_blocks = 4 in the checkpoint, 2 here"),
    "enable": (["--diffusion_blocks.no_enable"],
               "[diffusion_blocks] enable = True in the checkpoint, False here"),
    "sigma_max": (["--diffusion_blocks.sigma_max", "40"],
                  "[diffusion_blocks] sigma_max = 80.0 in the checkpoint, 40.0 here"),
    # another AdaLN width: named, not a tensor-shape mismatch from the loader
    "adaln_cond_dim": (["--diffusion_blocks.adaln_cond_dim", "64"],
                       "[diffusion_blocks] adaln_cond_dim = 256 in the checkpoint, 64 here"),
}


@pytest.mark.parametrize("damage", ["no .metadata", "truncated shard"])
def test_inference_falls_back_past_a_broken_newest_checkpoint(
    two_checkpoints, tmp_path, logs, damage
):
    """The inference tools pick a run's checkpoint as a resume does."""
    from diffusion_blocks.inference import resolve_checkpoint

    damage_fn, reported = DAMAGE[damage]
    checkpoints = copy_run(two_checkpoints, tmp_path)
    damage_fn(checkpoints / "step-2")
    assert resolve_checkpoint(checkpoints) == checkpoints / "step-1"
    assert f"(skipped: step-2: {reported}" in messages(logs)


@pytest.mark.parametrize("key", MISMATCHES)
def test_inference_refuses_a_checkpoint_of_other_settings(two_checkpoints, tmp_path, key):
    overrides, expected = MISMATCHES[key]
    job_config = parse_job_config(args_for(tmp_path, 2, *overrides))
    for load in (lambda: load_for_inference(job_config, two_checkpoints / "checkpoint"),
                 lambda: load_model(job_config, two_checkpoints / "checkpoint", "cpu")):
        with pytest.raises(ConfigError) as error:
            load()
        assert expected in str(error.value)
        assert str(error.value).startswith(
            f"checkpoint {two_checkpoints / 'checkpoint' / 'step-2'} was trained with "
            "other settings")
    # the same config as the run loads it
    load_for_inference(parse_job_config(args_for(tmp_path, 2)), two_checkpoints / "checkpoint")


def test_generate_tool_on_a_mismatched_checkpoint_exits_with_one_line(two_checkpoints):
    proc = subprocess.run(
        [sys.executable, "tools/generate.py", "--checkpoint",
         str(two_checkpoints / "checkpoint"), "--prompt", "the", "--max-new-tokens", "2",
         *args_for(two_checkpoints, 2, "--diffusion_blocks.num_blocks", "2")],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, h.output_of(proc)
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert "Traceback" not in proc.stderr
    assert line.startswith("error: checkpoint ") and MISMATCHES["num_blocks"][1] in line


def test_a_model_only_last_save_carries_the_identity_too(make_trainer, tmp_path):
    trainer = make_trainer(tmp_path, 1, "--checkpoint.last_save_model_only")
    trainer.checkpointer.save(curr_step=1, last_step=True)
    step = tmp_path / "checkpoint" / "step-1"
    stored = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert not any(key.startswith("optimizer") for key in stored)  # model only
    assert (step / IDENTITY_FILE).is_file()
    job_config = parse_job_config(args_for(tmp_path, 1, "--diffusion_blocks.overlap", "0.2"))
    with pytest.raises(ConfigError, match=(
        r"\[diffusion_blocks\] overlap = 0.1 in the checkpoint, 0.2 here"
    )):
        load_model(job_config, step, "cpu")


# ---------------------------------------------------------------------------
# 5. Gradient accumulation


def test_gradient_accumulation_gives_the_one_big_batch_update(make_trainer, tmp_path):
    """local batch 2 x 2 microbatches = global batch 4 (one rank) gives the gradients,
    loss and update of one batch of 4: the same sequences, sigmas and noise, because the
    data, sigma and noise streams are consumed in the same order."""
    no_clip = ["--checkpoint.no_enable", "--training.max_norm", "1e9"]
    big = make_trainer(tmp_path / "big", 2, *no_clip, "--training.local_batch_size", "4")
    accumulated = make_trainer(tmp_path / "acc", 2, *no_clip,
                               "--training.local_batch_size", "2",
                               "--training.global_batch_size", "4")
    assert (big.gradient_accumulation_steps, accumulated.gradient_accumulation_steps) == (1, 2)
    for trainer in (big, accumulated):
        trainer.step = 1
        trainer.train_step(trainer.batch_generator(trainer.dataloader))
    rows = [h.training_rows(tmp_path / name / "metrics.jsonl")[0] for name in ("big", "acc")]
    assert rows[0][h.LOSS] == pytest.approx(rows[1][h.LOSS], rel=1e-5)
    assert rows[0][h.GRAD_NORM] == pytest.approx(rows[1][h.GRAD_NORM], rel=1e-4)
    # Adam's first update is about lr x sign(gradient): entries whose gradient is float
    # noise around 0 may move by a fraction of lr in either run
    update_tolerance = 1e-2 * rows[0][h.LR]
    params = dict(accumulated.model.named_parameters())
    for name, p in big.model.named_parameters():
        q = params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=update_tolerance, msg=name)


def subnormal_survives() -> bool:
    """Whether float32 arithmetic on the CPU still yields a subnormal (a quarter of the
    smallest normal)."""
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    return bool((tiny / 4) != 0)


def test_cpu_training_and_inference_flush_subnormals_to_zero(make_trainer, tmp_path):
    """A CPU run flushes subnormal floats to zero (its steps slowed 2-4x without it as a
    block grew confident), and so does a model built for a tool."""
    from diffusion_blocks.inference import build_model, single_process_parallel_dims

    torch.set_flush_denormal(False)
    try:
        assert subnormal_survives()
        make_trainer(tmp_path / "run", 1)
        assert not subnormal_survives()
        torch.set_flush_denormal(False)
        build_model(parse_job_config(args_for(tmp_path / "tool", 1)), torch.device("cpu"),
                    single_process_parallel_dims())
        assert not subnormal_survives()
    finally:
        torch.set_flush_denormal(False)
