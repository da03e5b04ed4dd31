"""tools/bench_memory.py and tools/estimate_memory.py on the tiny debug model."""

import json
import subprocess
import sys

import pytest

from _train_helpers import DEBUG_TOML, REPO, subprocess_env

TINY = ["--training.seq_len", "64", "--training.local_batch_size", "4"]
KEYS = {"mode", "num_blocks", "ac", "offload", "activation_bytes", "resident_bytes",
        "peak_bytes", "ratio_to_e2e"}


def run_tool(name, *args):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / name), "--job.config_file", str(DEBUG_TOML), *TINY,
         *args, "--json"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("["):])


@pytest.fixture(scope="module")
def bench_rows():
    return run_tool("bench_memory.py", "--blocks", "4", "--ac", "none,full")


def test_bench_memory_rows_have_the_documented_keys(bench_rows):
    assert [(r["mode"], r["num_blocks"], r["ac"]) for r in bench_rows] == [
        ("e2e", 1, "none"), ("dblocks", 4, "none"), ("e2e", 1, "full"), ("dblocks", 4, "full")]
    for row in bench_rows:
        assert KEYS <= set(row)
        assert row["peak_bytes"] is None  # CPU cannot report a device peak
        assert row["activation_bytes"] > 0 and row["resident_bytes"] > 0
    assert [r["ratio_to_e2e"] for r in bench_rows if r["mode"] == "e2e"] == [1.0, 1.0]


def test_one_block_saves_fewer_activations_and_ac_saves_more(bench_rows):
    by = {(r["mode"], r["ac"]): r for r in bench_rows}
    # 2 of 8 layers on a 2T sequence: about half the layers' activations
    assert by["dblocks", "none"]["activation_bytes"] < 0.7 * by["e2e", "none"]["activation_bytes"]
    assert by["e2e", "full"]["activation_bytes"] < 0.2 * by["e2e", "none"]["activation_bytes"]
    # every AdamW moment of every block stays resident without offload
    assert by["dblocks", "none"]["resident_bytes"] >= by["e2e", "none"]["resident_bytes"]


def test_estimate_is_within_15_percent_of_the_measurement(bench_rows):
    for row in bench_rows:
        for key in ("activation_bytes", "resident_bytes"):
            measured, estimated = row[key], row[f"estimated_{key}"]
            assert abs(estimated - measured) <= 0.15 * measured, (row["mode"], row["ac"], key)


def test_estimator_models_offload_and_sharding():
    resident = run_tool("estimate_memory.py", "--blocks", "4", "--nproc", "1")
    offload = run_tool("estimate_memory.py", "--blocks", "4", "--nproc", "1",
                       "--diffusion_blocks.offload_inactive_blocks", "on")
    sharded = run_tool("estimate_memory.py", "--blocks", "4", "--nproc", "4")
    assert resident[0]["mode"] == "e2e" and resident[1]["num_blocks"] == 4
    assert offload[1]["resident_bytes"] < 0.6 * resident[1]["resident_bytes"]
    assert offload[0]["resident_bytes"] == resident[0]["resident_bytes"]  # e2e never offloads
    assert sharded[1]["resident_bytes"] == pytest.approx(resident[1]["resident_bytes"] / 4, rel=0.01)


def test_bench_throughput_reports_both_modes():
    rows = run_tool("bench_throughput.py", "--steps", "2", "--warmup", "1", "--modes", "eager",
                    "--num-blocks", "4")
    assert [(r["mode"], r["compile"]) for r in rows] == [("e2e", "eager"), ("dblocks", "eager")]
    for row in rows:
        assert row["items_per_s"] > 0 and row["seconds_per_step"] > 0
        assert row["mfu"] is None  # MFU needs a CUDA device's peak FLOPs
    assert rows[1]["ratio_to_e2e"] == pytest.approx(rows[1]["items_per_s"] / rows[0]["items_per_s"])
