"""The block-wise train loop (diffusion_blocks.train), end to end on CPU.

Multi-process runs go through torchrun in subprocesses (gloo, FSDP2 when world size >
1); tests/_train_helpers.py holds the launcher that records per-rank evidence. The
single-process unit tests build the real BlockwiseTrainer in this process (one gloo
process group of size 1 for the whole module).
"""

import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _train_helpers as h
from diffusion_blocks import train
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.diffusion.schedules import build_block_schedule

NUM_BLOCKS = 4  # llama3_debug.toml: 8 layers, 4 blocks of 2
# keys of every training row: torchtitan's MetricsProcessor's and ours
METRIC_KEYS = {
    "step", h.LOSS, h.MAX_LOSS, h.GRAD_NORM, h.LR, "n_tokens_seen", "throughput(tps)",
    "tflops", "mfu(%)", "time_metrics/end_to_end(s)", "memory/max_reserved(GiB)",
    h.CE, h.BLOCK, h.SIGMA,
    *(h.steps_key(b) for b in range(NUM_BLOCKS)),
}


def debug_args(dump_folder: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--job.config_file", str(h.DEBUG_TOML), *h.TINY,
        "--training.steps", str(steps), "--job.dump_folder", str(dump_folder), *extra,
    ]


def cumulative_counts(blocks: list[int], num_blocks: int) -> list[list[int]]:
    counts, out = [0] * num_blocks, []
    for b in blocks:
        counts[b] += 1
        out.append(list(counts))
    return out


def layers_of(block: int, layer_ranges) -> list[int]:
    start, stop = layer_ranges[block]
    return list(range(start, stop))


# ---------------------------------------------------------------------------
# Subprocess runs shared by several tests (each runs once per module)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 processes, gloo, FSDP2, random schedule, 20 steps, TensorBoard on. Rank 1's
    schedule is skewed (it proposes rank 0's block + 1 at every step): only rank 0's
    broadcast makes the ranks train the same block."""
    folder = tmp_path_factory.mktemp("fsdp")
    proc = h.torchrun(
        debug_args(folder, 20, "--checkpoint.no_enable", "--metrics.enable_tensorboard"),
        nproc=2, record_dir=folder / "records", timeout=300, skew_blocks=True,
    )
    h.check_ok(proc)
    return {
        "folder": folder,
        "records": h.read_records(folder / "records", 2),
        "metrics": h.training_rows(folder / "metrics.jsonl"),
        "output": h.output_of(proc),
    }


RESUME_ARGS = [
    "--checkpoint.enable", "--checkpoint.interval", "5", "--debug.seed", "0",
    "--diffusion_blocks.seed", "0", "--metrics.no_enable_tensorboard",
    # an LR schedule that does not depend on training.steps, so that the 5-step run
    # and the 10-step run see the same LR at every step (torchtitan shortens warmup
    # and decay to fit training.steps): 2 warmup steps, then constant
    "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0",
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Run A of the resume test: 10 uninterrupted steps, checkpoints at 5 and 10."""
    folder = tmp_path_factory.mktemp("run_a")
    proc = h.torchrun(debug_args(folder, 10, *RESUME_ARGS), timeout=300)
    h.check_ok(proc)
    return folder, h.training_rows(folder / "metrics.jsonl")


# ---------------------------------------------------------------------------
# 1. Two processes with FSDP2: same block on every rank, every step


def test_two_process_fsdp_run_trains_the_same_block_on_every_rank(fsdp_run):
    rank0, rank1 = fsdp_run["records"]
    for r, record in enumerate((rank0, rank1)):
        assert record["rank"] == r and record["world_size"] == 2
        assert record["finished_step"] == 20
        assert [s["step"] for s in record["steps"]] == list(range(1, 21))
        # FSDP2 really applied: the root and every layer are FSDP modules, every
        # parameter (and every gradient) is a DTensor sharded over the 2 ranks
        assert record["model_is_fsdp"]
        assert "DiffusionBlocksLlama" in record["model_mro"]
        assert record["fsdp_layers"] == 8
        assert record["dtensor_params"] == record["num_params"] > 0
        assert record["placements"] == ["(Shard(dim=0),)"]
        assert all(s["grads_are_dtensors"] for s in record["steps"])
        for s in record["steps"]:
            assert math.isfinite(s["loss"]) and math.isfinite(s["ce"])
            # only the trained block's layers ran forward and only they got gradients
            assert s["block"] == s["logged_block"]
            expected = layers_of(s["block"], record["layer_ranges"])
            assert s["ran_layers"] == expected, s
            assert s["grad_layers"] == expected, s
    # rank 0 trained the block its own schedule proposed; rank 1's (skewed) schedule
    # proposed another block at EVERY step, and rank 1 trained rank 0's block anyway:
    # the broadcast decided, not the identically seeded generators
    for s0, s1 in zip(rank0["steps"], rank1["steps"]):
        assert s0["proposed_block"] == s0["block"] == s1["block"], (s0, s1)
        assert s1["proposed_block"] == (s0["block"] + 1) % NUM_BLOCKS != s1["block"], (s0, s1)

    per_rank = [
        [(s["block"], s["ran_layers"], s["grad_layers"]) for s in r["steps"]]
        for r in (rank0, rank1)
    ]
    assert per_rank[0] == per_rank[1]
    blocks = [s["block"] for s in rank0["steps"]]
    assert len(set(blocks)) >= 3, f"random schedule should visit several blocks: {blocks}"
    # the sequence is the seeded random schedule (seed 0), replayed here
    replay = build_block_schedule("random", NUM_BLOCKS, 20, 0)
    assert blocks == [replay.block_for_step(s) for s in range(1, 21)]
    # rank 0's log agrees with the per-rank records
    metrics = fsdp_run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert [m[h.BLOCK] for m in metrics] == blocks
    assert [m[h.LOSS] for m in metrics] == [s["loss"] for s in rank0["steps"]]
    # both ranks logged the same global loss
    assert [s["loss"] for s in rank0["steps"]] == [s["loss"] for s in rank1["steps"]]
    assert rank0["block_steps"] == rank1["block_steps"] == h.block_steps(metrics[-1], NUM_BLOCKS)


# ---------------------------------------------------------------------------
# 2. torch.compile


def test_compiled_run_passes_on_cpu(tmp_path, write_toml):
    config = write_toml(
        "compiled.toml",
        f'extends = "{h.DEBUG_TOML}"\n'
        '[compile]\nenable = true\ncomponents = ["model"]\n'
        '[diffusion_blocks]\nblock_schedule = "round_robin"\n',
    )
    folder = tmp_path / "out"
    args = [
        "--job.config_file", str(config), *h.TINY, "--training.steps", "3",
        "--job.dump_folder", str(folder), "--checkpoint.no_enable",
        "--metrics.no_enable_tensorboard",
    ]
    proc = h.torchrun(args, record_dir=folder / "records", timeout=540)
    h.check_ok(proc)
    assert "Compiling each TransformerBlock with torch.compile" in h.output_of(proc)
    (record,) = h.read_records(folder / "records", 1)
    assert record["compiled_layers"] == 8
    assert [s["block"] for s in record["steps"]] == [0, 1, 2]
    for s in record["steps"]:
        assert math.isfinite(s["loss"])
        expected = layers_of(s["block"], record["layer_ranges"])
        assert s["ran_layers"] == s["grad_layers"] == expected, s
    metrics = h.training_rows(folder / "metrics.jsonl")
    assert [h.block_steps(m, NUM_BLOCKS) for m in metrics] == [
        [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]


# ---------------------------------------------------------------------------
# 3. Resume reproduces the uninterrupted run


def test_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    folder_a, metrics_a = reference_run
    assert [m["step"] for m in metrics_a] == list(range(1, 11))
    assert sorted(p.name for p in (folder_a / "checkpoint").iterdir()) == ["step-10", "step-5"]

    folder_b = tmp_path / "run_b"
    h.check_ok(h.torchrun(debug_args(folder_b, 5, *RESUME_ARGS), timeout=300))
    first = h.training_rows(folder_b / "metrics.jsonl")
    assert [m["step"] for m in first] == [1, 2, 3, 4, 5]
    # steps 1-5 are the same run as A's (seeded); at least one block was never
    # trained before the checkpoint, so it has no optimizer updates in it
    assert [m[h.LOSS] for m in first] == pytest.approx([m[h.LOSS] for m in metrics_a[:5]], rel=1e-6)
    assert 0 in h.block_steps(first[-1], NUM_BLOCKS), "precondition: a block untrained at step 5"

    # the block-choice, sigma and noise generators are part of the checkpoint
    import torch.distributed.checkpoint as dcp

    keys = set(
        dcp.FileSystemReader(str(folder_b / "checkpoint" / "step-5"))
        .read_metadata().state_dict_metadata
    )
    assert "train_state.block_schedule.generator" in keys
    assert {"train_state.step", "train_state.ntokens_seen", "train_state.sigma_rng_rank0",
            "train_state.noise_rng_rank0"} <= keys

    resumed = h.torchrun(debug_args(folder_b, 10, *RESUME_ARGS), timeout=300)
    h.check_ok(resumed)
    assert "Loading the checkpoint from" in h.output_of(resumed)
    assert "Training starts at step 6" in h.output_of(resumed)
    second = h.training_rows(folder_b / "metrics.jsonl")[5:]  # the file is appended to
    assert [m["step"] for m in second] == [6, 7, 8, 9, 10]
    reference = metrics_a[5:]
    # the resumed run draws the blocks A drew (the generator was restored, not reseeded)
    assert [m[h.BLOCK] for m in second] == [m[h.BLOCK] for m in reference]
    assert [h.block_steps(m, NUM_BLOCKS) for m in second] == [
        h.block_steps(m, NUM_BLOCKS) for m in reference]
    for got, want in zip(second, reference):
        # the token count continues from the checkpoint
        assert got["n_tokens_seen"] == want["n_tokens_seen"], got["step"]
        for key in (h.LOSS, h.CE, h.GRAD_NORM, h.SIGMA, h.LR):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=0), (got["step"], key)


def test_two_process_kill_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    """2 processes (gloo, FSDP2), checkpoints every 4 steps: killed after step 6 and
    resumed from step 4, the run's steps 5-8 equal an uninterrupted run's, and
    metrics.jsonl holds each step once, after a marker of the resume."""
    def args(folder: Path) -> list[str]:
        return debug_args(
            folder, 8, "--training.device", "cpu", "--checkpoint.enable",
            "--checkpoint.interval", "4", "--debug.seed", "0", "--diffusion_blocks.seed", "0",
            "--metrics.no_enable_tensorboard",
        )

    h.check_ok(h.torchrun(args(tmp_path / "a"), nproc=2))
    reference = h.training_rows(tmp_path / "a" / "metrics.jsonl")
    folder = tmp_path / "b"
    killed = h.torchrun(args(folder), nproc=2, record_dir=folder / "records", kill_after_step=6)
    assert killed.returncode != 0
    assert [r["step"] for r in h.read_jsonl(folder / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (folder / "checkpoint").iterdir()) == ["step-4"]

    resumed = h.torchrun(args(folder), nproc=2)
    h.check_ok(resumed)
    assert "Training starts at step 5" in h.output_of(resumed)
    rows = h.read_jsonl(folder / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert rows[4] == {"step": 4, "event": "resume", "dropped_rows": 2,
                       "checkpoint": str(folder / "checkpoint" / "step-4")}
    training = h.training_rows(folder / "metrics.jsonl")
    assert [r[h.BLOCK] for r in training] == [r[h.BLOCK] for r in reference]
    for got, want in zip(training, reference):
        assert got["n_tokens_seen"] == want["n_tokens_seen"], got["step"]
        for key in (h.LOSS, h.CE, h.GRAD_NORM, h.SIGMA, h.LR):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=0), (got["step"], key)


# ---------------------------------------------------------------------------
# In-process trainers (one gloo process group of size 1 for the module)


@pytest.fixture
def make_trainer(process_group, tmp_path):
    count = iter(range(1000))

    def build(*extra: str) -> train.BlockwiseTrainer:
        args = debug_args(
            tmp_path / f"trainer{next(count)}", 10,
            "--checkpoint.no_enable", "--metrics.no_enable_tensorboard", *extra,
        )
        return train.BlockwiseTrainer(parse_job_config([*h.CPU, *args]))

    with h.closing_trainers(build) as make:
        yield make


def force_block(trainer, block: int) -> None:
    trainer.mode.block_for_step = lambda step, device: block


def data_of(trainer):
    """The trainer's data iterator, as its train() builds it (counts tokens)."""
    return trainer.batch_generator(trainer.dataloader)


def logged_train_step(trainer, data_iterator) -> dict:
    """One train_step; returns what the trainer logged for it (log_freq 1): loss
    (global weighted mean), grad_norm, lr and our extra metrics."""
    logged = {}
    original = trainer.metrics_processor.log

    def log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        logged.update(extra_metrics or {}, loss=global_avg_loss, grad_norm=grad_norm)
        return original(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)

    trainer.metrics_processor.log = log
    trainer.step += 1
    try:
        assert trainer.train_step(data_iterator) is None
    finally:
        trainer.metrics_processor.log = original
    return logged


def run_step(trainer, data_iterator, block: int) -> dict:
    """One train_step on `block`; what the trainer logged for it."""
    force_block(trainer, block)
    logged = logged_train_step(trainer, data_iterator)
    assert trainer.block == block and logged[h.BLOCK] == block
    return logged


def block_of_param(name: str, layer_ranges) -> int | None:
    """The block owning a parameter, None for shared modules."""
    if not name.startswith("layers."):
        return None
    layer = int(name.split(".")[1])
    return next(b for b, r in enumerate(layer_ranges) if layer in r)


def optimizer_state(trainer, param) -> dict:
    (optimizer,) = list(trainer.optimizers)
    return optimizer.state.get(param, {})


def is_empty_state(state: dict) -> bool:
    """No state, or Adam's fresh state (step 0, all-zero moments): nothing learned."""
    if not state:
        return True
    return float(state["step"]) == 0 and all(
        not torch.any(v) for k, v in state.items() if k != "step"
    )


# ---------------------------------------------------------------------------
# 4. Inactive blocks are neither moved, decayed nor given optimizer state


def test_inactive_blocks_are_untouched_by_a_train_step(make_trainer):
    trainer = make_trainer(
        "--optimizer.lr", "1e-2", "--optimizer.weight_decay", "0.1",
        "--lr_scheduler.warmup_steps", "1",
    )
    model, ranges = trainer.model, trainer.model.partition.layer_ranges
    params = dict(model.named_parameters())
    assert {block_of_param(n, ranges) for n in params} == {None, 0, 1, 2, 3}
    data = data_of(trainer)

    snapshots, trained = [], set()
    for active in (1, 2):  # two steps: block 1, then block 2
        before = {n: p.detach().clone() for n, p in params.items()}
        state_before = {
            n: {k: v.clone() for k, v in optimizer_state(trainer, p).items()}
            for n, p in params.items()
        }
        metrics = run_step(trainer, data, active)
        assert metrics["lr"] > 0 and math.isfinite(metrics["loss"])
        snapshots.append(before)
        trained.add(active)
        for name, p in params.items():
            owner = block_of_param(name, ranges)
            state = optimizer_state(trainer, p)
            if owner is None or owner == active:
                assert p.grad is not None, name
                # it moved (update and/or weight decay), unless it is still all zero
                # with an all-zero gradient: AdaLN-Zero starts the sigma conditioning
                # at zero, so e.g. the sigma embedder gets no signal at step 1
                assert not torch.equal(p.detach(), before[name]) or (
                    not torch.any(before[name]) and not torch.any(p.grad)
                ), f"{name} did not move"
                assert float(state["step"]) == float(state_before[name].get("step", 0)) + 1
                assert not is_empty_state(state), name
            else:
                assert p.grad is None, name
                assert torch.equal(p.detach(), before[name]), f"{name} moved or decayed"
                # this step did not touch its optimizer state ...
                if state_before[name]:
                    assert set(state) == set(state_before[name]), name
                for key, value in state_before[name].items():
                    assert torch.equal(state[key], value), (name, key)
                # ... which holds nothing for a block that was never trained
                if owner not in trained:
                    assert is_empty_state(state), name
    # block 1 had real optimizer state (momentum) during step 2 and still did not move
    block1 = [n for n in params if block_of_param(n, ranges) == 1]
    assert all(not is_empty_state(optimizer_state(trainer, params[n])) for n in block1)
    # over both steps, blocks 0 and 3 stayed bit-identical to the initial weights
    for name, p in params.items():
        if block_of_param(name, ranges) in (0, 3):
            assert torch.equal(p.detach(), snapshots[0][name]), name


# ---------------------------------------------------------------------------
# 5. Only the active block's layers run


def test_only_the_active_blocks_layers_run(make_trainer):
    trainer = make_trainer()
    model, ranges = trainer.model, trainer.model.partition.layer_ranges
    calls: Counter = Counter()
    handles = []
    for layer_id, layer in model.layers.items():
        for module in layer.modules():  # the layer, its wrappers and every submodule
            handles.append(
                module.register_forward_pre_hook(
                    lambda *_, i=int(layer_id): calls.update([i])
                )
            )
    data = data_of(trainer)
    try:
        for block in (2, 0, 3, 1):
            calls.clear()
            run_step(trainer, data, block)
            active = set(ranges[block])
            assert set(calls) == active, (block, dict(calls))
            assert all(calls[i] > 0 for i in active)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------
# 6. Block schedules


def blocks_of(name: str, num_blocks: int, steps: int, seed: int = 0) -> list[int]:
    schedule = build_block_schedule(name, num_blocks, steps, seed)
    return [schedule.block_for_step(s) for s in range(1, steps + 1)]


def test_round_robin_schedule_cycles():
    assert blocks_of("round_robin", 4, 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert blocks_of("round_robin", 3, 7) == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("num_blocks, steps", [(4, 12), (4, 10), (3, 100), (2, 5)])
def test_sequential_schedule_gives_each_block_a_contiguous_share(num_blocks, steps):
    blocks = blocks_of("sequential", num_blocks, steps)
    # block b owns the steps whose fraction of the run lies in [b/B, (b+1)/B)
    for s, b in enumerate(blocks, start=1):
        assert b / num_blocks <= (s - 1) / steps < (b + 1) / num_blocks, (s, b)
    assert blocks == sorted(blocks) and set(blocks) == set(range(num_blocks))
    counts = Counter(blocks).values()
    assert max(counts) - min(counts) <= 1
    if steps % num_blocks == 0:
        n = steps // num_blocks
        assert blocks == [b for b in range(num_blocks) for _ in range(n)]


def test_random_schedule_is_reproducible_and_uniform():
    a = blocks_of("random", 4, 4000, seed=7)
    assert a == blocks_of("random", 4, 4000, seed=7)
    assert a[:200] != blocks_of("random", 4, 200, seed=8)
    counts = Counter(a)
    assert set(counts) == {0, 1, 2, 3}
    # 1000 expected per block, standard deviation ~27
    assert all(850 <= counts[b] <= 1150 for b in range(4)), counts

    # its generator state continues the sequence after a save/load
    s1 = build_block_schedule("random", 4, 100, 3)
    [s1.block_for_step(s) for s in range(1, 11)]
    state = s1.state_dict()
    tail = [s1.block_for_step(s) for s in range(11, 31)]
    s2 = build_block_schedule("random", 4, 100, 99)
    s2.load_state_dict(state)
    assert [s2.block_for_step(s) for s in range(11, 31)] == tail


def test_logged_block_steps_count_the_blocks_trained(fsdp_run, reference_run):
    for metrics in (fsdp_run["metrics"], reference_run[1]):
        blocks = [m[h.BLOCK] for m in metrics]
        logged = [h.block_steps(m, NUM_BLOCKS) for m in metrics]
        assert logged == cumulative_counts(blocks, NUM_BLOCKS)
        assert sum(logged[-1]) == len(metrics)
    # and the trainer's own final tally (per rank) matches the log
    final = h.block_steps(fsdp_run["metrics"][-1], NUM_BLOCKS)
    for record in fsdp_run["records"]:
        assert record["block_steps"] == final
    assert f"Training done: steps per block {final}" in fsdp_run["output"]


# ---------------------------------------------------------------------------
# 7. End-to-end baseline through the same entry point


def test_end_to_end_baseline_trains_stock_llama3_with_next_token_ce(tmp_path):
    folder = tmp_path / "e2e"
    args = debug_args(
        folder, 30, "--diffusion_blocks.no_enable", "--checkpoint.no_enable",
        "--metrics.no_enable_tensorboard", "--lr_scheduler.warmup_steps", "5",
    )
    proc = h.torchrun(args, record_dir=folder / "records", timeout=300)
    h.check_ok(proc)
    assert "end-to-end (diffusion_blocks disabled)" in h.output_of(proc)
    (record,) = h.read_records(folder / "records", 1)
    assert record["model_mro"][0] == "Transformer"
    assert "DiffusionBlocksLlama" not in record["model_mro"]
    for s in record["steps"]:
        assert s["block"] is None and s["proposed_block"] is None
        assert s["ran_layers"] == s["grad_layers"] == list(range(8))  # all layers
    rows = h.training_rows(folder / "metrics.jsonl")
    assert all(h.BLOCK not in m and h.SIGMA not in m for m in rows)
    # the logged loss is the plain next-token CE
    assert all(m[h.LOSS] == pytest.approx(m[h.CE], rel=1e-5) for m in rows)
    losses = [m[h.LOSS] for m in rows]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, losses


def test_end_to_end_loss_is_next_token_cross_entropy(make_trainer):
    from torchtitan.models.llama3 import Transformer

    trainer = make_trainer("--diffusion_blocks.no_enable")
    assert type(trainer.model) is Transformer
    inputs, labels = next(data_of(trainer))
    tokens = inputs["input"]
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    out = trainer.family.task.end_to_end_loss(
        trainer.model, inputs, labels, {}, trainer.noise_generator
    )
    with torch.no_grad():
        logits = trainer.model(tokens)
        expected = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    # sums over the tokens: the mean is the next-token CE
    assert out.num_items == labels.numel()
    assert float(out.loss_sum.detach() / out.num_items) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.unweighted_sum / out.num_items) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------------------
# 8. Bad launches stop with a clear message


def test_more_processes_than_the_mesh_allows_fails_clearly(tmp_path):
    proc = h.torchrun(
        debug_args(tmp_path, 2, "--parallelism.data_parallel_shard_degree", "4",
                   "--checkpoint.no_enable"),
        nproc=2, timeout=180,
    )
    assert proc.returncode != 0
    assert "[parallelism] does not fit 2 processes" in h.output_of(proc)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_fails_clearly(tmp_path):
    proc = h.torchrun(
        debug_args(tmp_path, 2, "--training.device", "cuda", "--checkpoint.no_enable"),
        timeout=180,
    )
    assert proc.returncode != 0
    assert "no CUDA device is available" in h.output_of(proc)
    assert "--training.device" in h.output_of(proc)  # names where it was set


def test_resuming_with_a_different_num_blocks_fails_clearly(reference_run, tmp_path):
    folder_a, _ = reference_run
    shutil.copytree(folder_a / "checkpoint" / "step-5", tmp_path / "checkpoint" / "step-5")
    proc = h.torchrun(
        debug_args(tmp_path, 10, *RESUME_ARGS, "--diffusion_blocks.num_blocks", "2"),
        timeout=180,
    )
    assert proc.returncode != 0
    out = h.output_of(proc)
    assert "[diffusion_blocks] num_blocks = 4 in the checkpoint, 2 here" in out
    assert "[diffusion_blocks] layers_per_block = [2, 2, 2, 2] in the checkpoint, [4, 4] here" in out
    assert not (tmp_path / "checkpoint" / "step-10").exists()


# ---------------------------------------------------------------------------
# 9. Metrics: TensorBoard events and metrics.jsonl


def test_metrics_jsonl_and_tensorboard(fsdp_run):
    metrics = fsdp_run["metrics"]
    assert len(metrics) == 20
    assert len(h.read_jsonl(fsdp_run["folder"] / "metrics.jsonl")) == 20  # no other rows
    for m in metrics:
        assert METRIC_KEYS <= set(m), METRIC_KEYS - set(m)
        for key in METRIC_KEYS - {"mfu(%)"}:
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]), key
        assert m["mfu(%)"] is None  # no peak FLOPS for a host CPU
        assert m["memory/max_reserved(GiB)"] > 0 and m["throughput(tps)"] > 0
        assert 0 <= m[h.BLOCK] < NUM_BLOCKS
        # 2 ranks x 2 sequences x 32 tokens per step, counted by torchtitan
        assert m["n_tokens_seen"] == 2 * 2 * 32 * m["step"]
        # the running CE of every block trained so far
        trained = [b for b, n in enumerate(h.block_steps(m, NUM_BLOCKS)) if n > 0]
        assert {b for b in range(NUM_BLOCKS) if h.running_key(b) in m} == set(trained)

    events = list((fsdp_run["folder"] / "tb").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(accumulator.Scalars(tag))
    for tag in (h.LOSS, h.CE, h.GRAD_NORM, h.LR, h.BLOCK, h.SIGMA, h.steps_key(0)):
        assert tag in scalars, sorted(scalars)
    assert sorted(e.step for e in scalars[h.LOSS]) == list(range(1, 21))
    for tag in (h.LOSS, h.CE, h.BLOCK):
        by_step = {e.step: e.value for e in scalars[tag]}
        for m in metrics:
            assert by_step[m["step"]] == pytest.approx(m[tag], rel=1e-6), tag


PORT_HELD_SCRIPT = """
import os, socket
import torch.distributed as dist
from diffusion_blocks.train import use_single_process_env
use_single_process_env()
port = int(os.environ["MASTER_PORT"])
with socket.socket() as s:  # the port is held from the moment it is chosen
    try:
        s.bind(("127.0.0.1", port))
        print("free")
    except OSError:
        print("held")
dist.init_process_group("gloo")  # the process group connects to that store
print(dist.get_world_size(), os.environ["TORCHELASTIC_USE_AGENT_STORE"])
"""


def test_single_process_launch_holds_its_rendezvous_port():
    import subprocess
    import sys

    env = {k: v for k, v in h.subprocess_env().items()
           if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "TORCHELASTIC_USE_AGENT_STORE")}
    out = subprocess.run([sys.executable, "-c", PORT_HELD_SCRIPT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["held", "1", "True"]
