"""Block-parallel training: 4 gloo processes, B = 2 groups of 2."""

import statistics

import pytest

from _train_helpers import (
    BLOCK, CE, DEBUG_TOML, GRAD_NORM, LOSS, LR, TINY, block_steps, check_ok, read_jsonl,
    read_records, torchrun, training_rows,
)

STEPS = 16
CHECKPOINT_INTERVAL = 8


def block_parallel_args(dump) -> list[str]:
    return [
        "--job.config_file", str(DEBUG_TOML), *TINY,
        "--job.dump_folder", str(dump),
        "--training.steps", str(STEPS),
        "--training.device", "cpu",
        "--checkpoint.interval", str(CHECKPOINT_INTERVAL),
        "--metrics.no_enable_tensorboard",
        "--diffusion_blocks.num_blocks", "2",
        "--diffusion_blocks.block_parallel",
        "--debug.seed", "0",
        "--lr_scheduler.warmup_steps", "3",
    ]


@pytest.fixture(scope="module")
def block_parallel_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("bp")
    proc = torchrun(block_parallel_args(dump), nproc=4, record_dir=dump / "records")
    check_ok(proc)
    return read_records(dump / "records", 4), dump


def test_groups_train_different_blocks_and_only_their_layers(block_parallel_run):
    records, _ = block_parallel_run
    assert [r["group"] for r in records] == [0, 0, 1, 1]
    for record in records:
        own = list(range(*record["layer_ranges"][record["group"]]))
        assert len(record["steps"]) == STEPS
        for step in record["steps"]:
            assert step["ran_layers"] == own
            assert step["grad_layers"] == own


def test_shared_parameters_identical_on_every_rank_after_each_step(block_parallel_run):
    records, _ = block_parallel_run
    # ranks holding the same shard index in different groups: (0, 2) and (1, 3)
    for a, b in ((0, 2), (1, 3)):
        for step_a, step_b in zip(records[a]["steps"], records[b]["steps"]):
            assert step_a["shared_checksum"] == step_b["shared_checksum"], step_a["step"]
        # and the shared modules did train
        assert records[a]["steps"][-1]["shared_checksum"] != records[a]["initial"]["shared_checksum"]
    # the global loss (as logged) and clip norm are the same on every rank
    for step in range(STEPS):
        losses = {r["steps"][step]["loss"] for r in records}
        assert len(losses) == 1 and None not in losses, losses
        assert len({r["steps"][step]["grad_norm"] for r in records}) == 1


def test_a_block_only_moves_in_its_own_group_until_checkpoint_sync(block_parallel_run):
    records, _ = block_parallel_run
    for record in records:
        other = 1 - record["group"]
        frozen = record["initial"]["block_checksums"][other]
        for step in record["steps"][: CHECKPOINT_INTERVAL - 1]:
            assert step["block_checksums"][other] == frozen
        assert record["steps"][0]["block_checksums"][record["group"]] != \
            record["initial"]["block_checksums"][record["group"]]
    # at a checkpoint every group receives the owning group's copy of each block
    for a, b in ((0, 2), (1, 3)):
        for index in (CHECKPOINT_INTERVAL - 1, STEPS - 1):
            synced_a = records[a]["steps"][index]["after_save"]["block_checksums"]
            synced_b = records[b]["steps"][index]["after_save"]["block_checksums"]
            assert synced_a == synced_b
            owner_of = {0: records[a] if records[a]["group"] == 0 else records[b],
                        1: records[a] if records[a]["group"] == 1 else records[b]}
            for block in (0, 1):
                assert synced_a[block] == owner_of[block]["steps"][index]["block_checksums"][block]


def test_loss_statistics_match_the_single_group_random_schedule(block_parallel_run, tmp_path):
    records, dump = block_parallel_run
    # Same steps, same 4 ranks: the shared modules get the same expected gradient (a
    # uniform mixture over blocks) in both runs; block-parallel gives each block B x
    # the updates, so its loss must fall at least as fast.
    proc = torchrun([
        "--job.config_file", str(DEBUG_TOML), *TINY,
        "--job.dump_folder", str(tmp_path),
        "--training.steps", str(STEPS),
        "--checkpoint.no_enable", "--metrics.no_enable_tensorboard",
        "--diffusion_blocks.num_blocks", "2",
        "--debug.seed", "0",
        "--lr_scheduler.warmup_steps", "3",
    ], nproc=4)
    check_ok(proc)
    random_rows = training_rows(tmp_path / "metrics.jsonl")
    parallel_rows = training_rows(dump / "metrics.jsonl")
    assert len(parallel_rows) == len(random_rows) == STEPS
    assert block_steps(parallel_rows[-1], 2) == [STEPS, STEPS]
    assert sum(block_steps(random_rows[-1], 2)) == STEPS
    # every block trains every step: no single block to log
    assert all(BLOCK not in r for r in parallel_rows) and all(BLOCK in r for r in random_rows)

    def mean_ce(rows, part):
        return statistics.mean(r[CE] for r in part(rows))

    first = lambda rows: rows[:3]  # noqa: E731
    last = lambda rows: rows[-6:]  # noqa: E731
    # both start from the same untrained loss and both learn
    assert abs(mean_ce(parallel_rows, first) - mean_ce(random_rows, first)) < 0.05 * mean_ce(random_rows, first)
    for rows in (parallel_rows, random_rows):
        assert mean_ce(rows, last) < 0.8 * mean_ce(rows, first)
    assert mean_ce(parallel_rows, last) <= 1.1 * mean_ce(random_rows, last)


def test_kill_and_resume_reproduce_the_uninterrupted_block_parallel_run(
    block_parallel_run, tmp_path
):
    """Killed after step 10 (checkpoint at 8, where every group received every block)
    and resumed: steps 9-16 equal the uninterrupted run's."""
    _, reference_dump = block_parallel_run
    killed = torchrun(block_parallel_args(tmp_path), nproc=4, record_dir=tmp_path / "records",
                      kill_after_step=CHECKPOINT_INTERVAL + 2)
    assert killed.returncode != 0
    check_ok(torchrun(block_parallel_args(tmp_path), nproc=4))
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [*range(1, CHECKPOINT_INTERVAL + 1), CHECKPOINT_INTERVAL,
                     *range(CHECKPOINT_INTERVAL + 1, STEPS + 1)]
    resumed = training_rows(tmp_path / "metrics.jsonl")
    reference = training_rows(reference_dump / "metrics.jsonl")
    assert len(resumed) == len(reference) == STEPS
    for got, want in zip(resumed, reference):
        for key in (LOSS, CE, GRAD_NORM, LR):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=0), (got["step"], key)
