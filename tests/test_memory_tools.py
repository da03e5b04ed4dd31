"""tools/bench/memory.py and tools/bench/estimate_memory.py on the tiny debug model, checked
against a measurement made here, independently of diffusion_blocks.memory: the model
built as the trainer builds it, one real training step on the CPU, and

- activation bytes: the tensors autograd saves for backward, caught by this file's own
  saved-tensor hook (distinct storages; parameters and views of them are resident
  memory, not activations, by the estimator's documented definition);
- parameters, gradients and AdamW state: summed from the tensors themselves, after a
  plain torch AdamW has stepped every block once (the estimator assumes every block has
  trained: two fp32 moments per parameter).
"""

import json
import sys
from dataclasses import dataclass

import pytest
import torch

from _train_helpers import CPU, DEBUG_TOML, REPO, subprocess_env, torchrun_script
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.eval.memory import estimate_step
from diffusion_blocks.inference import single_process_parallel_dims
from diffusion_blocks.inference import build_model

TINY = ["--training.seq_len", "64", "--training.local_batch_size", "4"]
KEYS = {"mode", "num_blocks", "ac", "offload", "activation_bytes", "resident_bytes",
        "peak_bytes", "ratio_to_e2e"}
MODES = {"e2e": ["--diffusion_blocks.no_enable"], "dblocks": ["--diffusion_blocks.num_blocks", "4"]}
# the estimator's fused-attention footprint vs what the CPU kernels really save
ACTIVATION_TOLERANCE = 0.10


def run_tool(name, *args):
    """A tool on the tiny debug config, on the CPU. The bench tools build trainers (a
    process group): they run under torchrun, whose rendezvous cannot lose its port."""
    script = [str(REPO / "tools" / name), *CPU, "--job.config_file", str(DEBUG_TOML), *TINY,
              *args, "--json"]
    if name in ("bench/memory.py", "bench/throughput.py"):
        proc = torchrun_script(script, 1, timeout=600)
    else:
        import subprocess

        proc = subprocess.run([sys.executable, *script], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("["):proc.stdout.rindex("]") + 1])


# ---------------------------------------------------------------------------
# The independent measurement


@dataclass
class Measured:
    activation_bytes: int
    params: int
    grads: int
    optimizer_state: int

    @property
    def resident(self) -> int:
        return self.params + self.grads + self.optimizer_state


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_step(job_config) -> Measured:
    """One training forward + backward of block 0 (the estimator's choice: the largest,
    the first of equals) or of the whole twin; then AdamW steps every block once."""
    torch.manual_seed(0)
    model, _, run = build_model(job_config, torch.device("cpu"), single_process_parallel_dims())
    model.train()
    params = list(model.parameters())
    param_ids = {id(p) for p in params}
    saved: dict[int, int] = {}  # storage address -> bytes

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in param_ids:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    batch, seq_len = job_config.training.local_batch_size, job_config.training.seq_len
    tokens = torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    def loss(block: int):
        if run.enabled:
            sigma = torch.full((batch,), 0.5)
            sums = run.family.task.denoiser_loss(
                model, {"input": tokens}, tokens, block, sigma, torch.Generator().manual_seed(1))
        else:
            sums = run.family.task.end_to_end_loss(model, {"input": tokens}, tokens, {}, None)
        return sums.loss_sum / sums.num_items

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        first = loss(0)
    first.backward()
    grads = nbytes(p.grad for p in params if p.grad is not None)
    optimizer.step()
    for block in range(1, model.partition.num_blocks if run.enabled else 1):
        optimizer.zero_grad(set_to_none=True)
        loss(block).backward()
        optimizer.step()
    state = nbytes(
        value for per_param in optimizer.state.values() for value in per_param.values()
        if torch.is_tensor(value) and value.dim() > 0  # not the scalar step counters
    )
    return Measured(sum(saved.values()), nbytes(params), grads, state)


def config(mode: str, ac: str):
    return parse_job_config([*CPU, "--job.config_file", str(DEBUG_TOML), *TINY, *MODES[mode],
                             "--activation_checkpoint.mode", ac])


@pytest.fixture(scope="module")
def measured():
    return {(mode, ac): measure_step(config(mode, ac))
            for mode in ("e2e", "dblocks") for ac in ("none", "full")}


def test_the_measurement_sees_what_it_should(measured):
    # sanity of the yardstick itself: 2 of 8 layers trained, every moment of every block
    e2e, one_block = measured["e2e", "none"], measured["dblocks", "none"]
    assert one_block.grads < 0.6 * one_block.params and e2e.grads == e2e.params
    assert one_block.optimizer_state == 2 * one_block.params
    assert measured["e2e", "full"].activation_bytes < 0.5 * e2e.activation_bytes


@pytest.mark.parametrize("mode", ["e2e", "dblocks"])
@pytest.mark.parametrize("ac", ["none", "full"])
def test_estimate_step_matches_the_independent_measurement(measured, mode, ac):
    estimate = estimate_step(config(mode, ac), nproc=1)
    real = measured[mode, ac]
    assert estimate.resident.params == real.params
    assert estimate.resident.grads == real.grads
    assert estimate.resident.optimizer_state == real.optimizer_state
    assert estimate.activation_bytes == pytest.approx(real.activation_bytes, rel=ACTIVATION_TOLERANCE)


NO_AC = ["--activation_checkpoint.mode", "none"]


@pytest.fixture(scope="module")
def estimated_rows():
    return run_tool("bench/estimate_memory.py", "--blocks", "4", "--nproc", "1", *NO_AC)


def test_estimate_memory_tool_reports_the_measured_figures(estimated_rows, measured):
    assert [(r["mode"], r["num_blocks"], r["ac"]) for r in estimated_rows] == [
        ("e2e", 1, "none"), ("dblocks", 4, "none")]
    for row in estimated_rows:
        real = measured[row["mode"], "none"]
        assert row["resident_bytes"] == real.resident, row
        assert row["activation_bytes"] == pytest.approx(real.activation_bytes, rel=ACTIVATION_TOLERANCE)
        assert row["peak_bytes"] >= row["resident_bytes"] + row["activation_bytes"]
    assert estimated_rows[0]["ratio_to_e2e"] == 1.0


def test_estimator_models_offload_and_sharding(estimated_rows):
    resident = estimated_rows
    offload = run_tool("bench/estimate_memory.py", "--blocks", "4", "--nproc", "1", *NO_AC,
                       "--diffusion_blocks.offload_inactive_blocks", "on")
    sharded = run_tool("bench/estimate_memory.py", "--blocks", "4", "--nproc", "4", *NO_AC)
    assert resident[0]["mode"] == "e2e" and resident[1]["num_blocks"] == 4
    assert offload[1]["resident_bytes"] < 0.6 * resident[1]["resident_bytes"]
    assert offload[0]["resident_bytes"] == resident[0]["resident_bytes"]  # e2e never offloads
    assert sharded[1]["resident_bytes"] == pytest.approx(resident[1]["resident_bytes"] / 4, rel=0.01)


def test_estimator_models_whole_model_offload():
    """[training] enable_cpu_offload: nothing resident; on the device the computing
    layers, the root's parameters and gradients for the whole step, and the larger of
    the embedding unit and the head unit (norm, final AdaLN, output) with its gradient."""
    args = [*CPU, "--job.config_file", str(DEBUG_TOML), *TINY, *NO_AC,
            "--diffusion_blocks.offload_inactive_blocks", "on"]
    layers_only = estimate_step(parse_job_config(args), nproc=1)
    whole = estimate_step(parse_job_config([*args, "--training.enable_cpu_offload"]), nproc=1)
    model, _, _ = build_model(parse_job_config(args), torch.device("meta"),
                              single_process_parallel_dims(), parallelize=lambda m: m)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    embedding = sum(n for k, n in sizes.items() if k.startswith("tok_embeddings."))
    head = sum(n for k, n in sizes.items() if k.split(".")[0] in ("norm", "final_adaln", "output"))
    root = sum(n for k, n in sizes.items() if not k.startswith(("layers.", "tok_embeddings.")))
    root -= head
    assert head > embedding > root > 0  # the final AdaLN makes the head group the larger
    shared_bytes = 4 * (embedding + head + root)
    assert whole.resident.total == 0
    assert whole.activation_bytes == layers_only.activation_bytes
    # layer offload keeps the shared parameters, gradients and two AdamW moments resident
    assert layers_only.resident.total == 4 * shared_bytes
    assert whole.transient_bytes - layers_only.transient_bytes == 2 * 4 * (root + head)
    assert whole.peak_bytes < layers_only.peak_bytes


# ---------------------------------------------------------------------------
# The benchmark: its own counters in real trainer steps


@pytest.fixture(scope="module")
def bench_rows():
    return run_tool("bench/memory.py", "--blocks", "4", "--ac", "none,full")


def test_bench_memory_rows_have_the_documented_keys(bench_rows):
    assert [(r["mode"], r["num_blocks"], r["ac"]) for r in bench_rows] == [
        ("e2e", 1, "none"), ("dblocks", 4, "none"), ("e2e", 1, "full"), ("dblocks", 4, "full")]
    for row in bench_rows:
        assert KEYS <= set(row)
        assert row["peak_bytes"] is None  # CPU cannot report a device peak
        assert row["activation_bytes"] > 0 and row["resident_bytes"] > 0
    assert [r["ratio_to_e2e"] for r in bench_rows if r["mode"] == "e2e"] == [1.0, 1.0]


def test_bench_memory_adds_offload_rows_where_the_device_is_not_the_host(monkeypatch):
    """On a CUDA device each B is measured again with offloaded layers (rows with
    offload true); on the CPU (one memory) there are no such rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_memory", REPO / "tools" / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for device_type, expected in (("cpu", [False, False]), ("cuda", [False, True, False, True])):
        calls = []

        def fake_measure(args, steps, device_type=device_type):
            calls.append(args)
            offloaded = args[args.index("--diffusion_blocks.offload_inactive_blocks") + 1] == "on" \
                if "--diffusion_blocks.offload_inactive_blocks" in args else False
            return {"activation_bytes": 10, "resident_bytes": 1 if offloaded else 5,
                    "peak_bytes": None, "device_type": device_type}

        monkeypatch.setattr(bench, "measure", fake_measure)
        rows = bench.benchmark_rows_at([], [2, 4], ["none"], 0)
        assert [r["offload"] for r in rows[1:]] == expected
        assert [r["num_blocks"] for r in rows] == ([1, 2, 4] if device_type == "cpu" else [1, 2, 2, 4, 4])
        assert all("device_type" not in r for r in rows)
        offloaded = [r for r in rows if r["offload"]]
        assert all(r["ratio_to_e2e"] == pytest.approx(11 / 15) for r in offloaded)


def test_one_block_saves_fewer_activations_and_ac_saves_more(bench_rows):
    by = {(r["mode"], r["ac"]): r for r in bench_rows}
    # 2 of 8 layers on a 2T sequence: about half the layers' activations
    assert by["dblocks", "none"]["activation_bytes"] < 0.7 * by["e2e", "none"]["activation_bytes"]
    assert by["e2e", "full"]["activation_bytes"] < 0.2 * by["e2e", "none"]["activation_bytes"]
    # every AdamW moment of every block stays resident without offload
    assert by["dblocks", "none"]["resident_bytes"] >= by["e2e", "none"]["resident_bytes"]


def test_bench_memory_measures_what_the_independent_count_measures(bench_rows, measured):
    # the trainer's step saves a few scalars more (the loss division): 1% tolerance
    for row in bench_rows:
        real = measured[row["mode"], row["ac"]]
        assert row["resident_bytes"] == real.resident, row
        assert row["activation_bytes"] == pytest.approx(real.activation_bytes, rel=0.01), row
        # and its estimate column is the estimator's, within the same bounds as above
        assert row["estimated_resident_bytes"] == real.resident, row
        assert row["estimated_activation_bytes"] == pytest.approx(
            real.activation_bytes, rel=ACTIVATION_TOLERANCE)


def test_bench_throughput_reports_both_modes():
    rows = run_tool("bench/throughput.py", "--steps", "2", "--warmup", "1", "--modes", "eager",
                    "--num-blocks", "4")
    assert [(r["mode"], r["compile"]) for r in rows] == [("e2e", "eager"), ("dblocks", "eager")]
    for row in rows:
        assert row["items_per_s"] > 0 and row["seconds_per_step"] > 0
        assert row["mfu"] is None  # MFU needs a CUDA device's peak FLOPs
    assert rows[1]["ratio_to_e2e"] == pytest.approx(rows[1]["items_per_s"] / rows[0]["items_per_s"])


def estimate_memory_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "estimate_memory_tool", REPO / "tools" / "bench" / "estimate_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config, blocks, expected", [
    ("recurrent_debug.toml", None, [1]),        # no --blocks given: none blamed
    ("llama3_debug.toml", None, [2, 4, 8]),
    ("vit_digits.toml", None, "dblocks_vit is an image model"),
    ("dit_digits.toml", [2], "dblocks_dit is an image model"),
    ("recurrent_debug.toml", [2], "--blocks 2: dblocks_recurrent trains one block"),
])
def test_estimate_memory_picks_or_refuses_the_blocks_per_family(config, blocks, expected):
    from diffusion_blocks.errors import ConfigError

    job_config = parse_job_config(["--job.config_file", str(REPO / "train_configs" / config)])
    tool = estimate_memory_tool()
    if isinstance(expected, list):
        assert tool.blocks_for(job_config, blocks) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            tool.blocks_for(job_config, blocks)
