"""Offloading inactive blocks: FSDP2 keeps every layer's sharded parameters, gradients
and optimizer state in host memory; shared modules stay on the training device.

On this CPU-only machine host and device are the same memory, so these tests prove
the structure and that the numerics are unchanged; the device-memory effect is what
tools/bench/memory.py and tools/bench/estimate_memory.py report on a GPU."""

import pytest

from _train_helpers import (
    BLOCK, DEBUG_TOML, GRAD_NORM, LOSS, TINY, check_ok, read_records, torchrun, training_rows,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.parallel.fsdp import offloads_inactive_blocks


def run(tmp_path, offload: str, record: bool, *extra: str):
    dump = tmp_path / (offload + "".join(extra).replace("-", "_").replace(".", "_"))
    proc = torchrun([
        "--job.config_file", str(DEBUG_TOML), *TINY,
        "--job.dump_folder", str(dump),
        "--training.steps", "8",
        "--checkpoint.no_enable", "--metrics.no_enable_tensorboard",
        "--diffusion_blocks.offload_inactive_blocks", offload,
        "--diffusion_blocks.block_schedule", "sequential",
        "--debug.seed", "0", *extra,
    ], nproc=2, record_dir=dump / "records" if record else None)
    check_ok(proc)
    return dump


def test_offloaded_training_matches_resident_training(tmp_path):
    on = training_rows(run(tmp_path, "on", record=True) / "metrics.jsonl")
    off = training_rows(run(tmp_path, "off", record=False) / "metrics.jsonl")
    assert [r[BLOCK] for r in on] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r[BLOCK] for r in off] == [0, 0, 1, 1, 2, 2, 3, 3]
    # same math; torchtitan's resident path buckets the embedding and head as their own
    # FSDP units, so float reductions differ in order: equal to float32 round-off
    assert [r[LOSS] for r in on] == pytest.approx([r[LOSS] for r in off], rel=1e-5)
    assert [r[GRAD_NORM] for r in on] == pytest.approx([r[GRAD_NORM] for r in off], rel=1e-5)

    for record in read_records(tmp_path / "on" / "records", 2):
        assert record["offloaded_layers"] == 8      # every layer unit lives on the host
        assert record["root_offloaded"] is False    # shared modules stay on the device
        assert record["layer_param_devices"] == ["cpu"]
        assert record["layer_state_devices"] == ["cpu"]
        assert record["fsdp_layers"] == 8 and record["model_is_fsdp"]
        assert record["shared_units"] == [True, True]  # embedding, head group
        assert record["shared_units_offloaded"] == [False, False]


def test_whole_model_offload_matches_resident_training(tmp_path):
    """[training] enable_cpu_offload with offloaded blocks: the shared modules (root,
    embedding unit, head unit) live on the host too; the numbers do not change."""
    whole = run(tmp_path, "on", True, "--training.enable_cpu_offload")
    on = training_rows(whole / "metrics.jsonl")
    off = training_rows(run(tmp_path, "off", record=False) / "metrics.jsonl")
    assert [r[BLOCK] for r in on] == [r[BLOCK] for r in off] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r[LOSS] for r in on] == pytest.approx([r[LOSS] for r in off], rel=1e-5)
    assert [r[GRAD_NORM] for r in on] == pytest.approx([r[GRAD_NORM] for r in off], rel=1e-5)
    for record in read_records(whole / "records", 2):
        assert record["offloaded_layers"] == 8
        assert record["root_offloaded"] is True
        assert record["shared_units_offloaded"] == [True, True]


@pytest.mark.parametrize(
    "offload,schedule,expected",
    [("auto", "sequential", True), ("auto", "random", False), ("on", "random", True),
     ("off", "sequential", False)],
)
def test_auto_offloads_with_the_sequential_schedule(write_toml, offload, schedule, expected):
    path = write_toml("o.toml", f'[diffusion_blocks]\noffload_inactive_blocks = "{offload}"\n'
                                f'block_schedule = "{schedule}"\n')
    assert offloads_inactive_blocks(parse_job_config(["--job.config_file", str(path)])) is expected


def test_bad_offload_value_is_reported(write_toml):
    path = write_toml("bad.toml", '[diffusion_blocks]\noffload_inactive_blocks = "yes"\n')
    with pytest.raises(ConfigError, match="offload_inactive_blocks.*'auto', 'on', 'off'"):
        parse_job_config(["--job.config_file", str(path)])


@pytest.mark.parametrize("offload", ["off", "on"])
def test_fsdp_gradients_equal_single_process_gradients(tmp_path, offload):
    """Each rank's loss sum over the global item count, summed over ranks by FSDP, is the
    single-process mean gradient, whichever FSDP path built the model."""
    import json

    from _train_helpers import REPO, torchrun_script

    out = tmp_path / "grads.json"
    # _grad_check.py runs on the CPU with gloo whatever the host has
    proc = torchrun_script([
        str(REPO / "tests" / "_grad_check.py"), str(out),
        "--job.config_file", str(DEBUG_TOML), "--training.seq_len", "32",
        "--diffusion_blocks.offload_inactive_blocks", offload,
    ], nproc=2)
    check_ok(proc)
    result = json.loads(out.read_text())
    assert result["num_grads"] > 10
    assert result["max_relative_error"] < 1e-4
