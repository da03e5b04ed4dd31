"""Helpers for the train-loop tests (test_train_loop, test_offload, test_block_parallel,
test_config, test_vision_train).

Two roles:
- imported by the tests: launching `diffusion_blocks.train` (or this file, or another
  script) under torchrun in a subprocess, on the CPU with gloo, reading metrics.jsonl (torchtitan's MetricsProcessor
  rows plus ours, see `training_rows` and the key names below) and the per-rank records;
- run as a script under torchrun (`python -m torch.distributed.run ... tests/_train_helpers.py
  <trainer args>`): a test-only launcher that runs `diffusion_blocks.train.main` itself
  with the real `BlockwiseTrainer`, instrumented, and after training writes
  `rank<R>.json` into $DBLOCKS_TEST_RECORD_DIR with what THIS rank did at every step:
  the block its own schedule proposed (before rank 0's broadcast), the block train_step
  trained, the layers whose forward ran, the layers whose parameters got a gradient,
  the loss and unweighted loss the trainer logged, the gradient norm clip_gradients
  returned, checksums of the local shards; plus how the model was built (class, FSDP,
  DTensor parameters, compiled layers, offload). With $DBLOCKS_TEST_SKEW_BLOCKS set,
  every rank but 0 proposes another block than rank 0 at every step (its own
  schedule's block + rank, mod B), so only rank 0's broadcast can make them agree. With `kill_after_step=K` every rank
  instead dies (os._exit, as under kill -9) right after step K's checkpoint save.

Launches are race-free and pinned to the CPU: torchrun runs `--standalone` (its agent
binds the rendezvous store to a port the kernel picks and hands that live store to the
workers: no port is chosen, released and bound again later), and the trainer gets
`--training.device cpu` (gloo), so a host with a GPU runs the same CPU tests.
"""

import gc
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = REPO / "train_configs" / "llama3_debug.toml"
LAUNCHER = Path(__file__).resolve()
RECORD_ENV = "DBLOCKS_TEST_RECORD_DIR"
SKEW_ENV = "DBLOCKS_TEST_SKEW_BLOCKS"

# the device every test means: CPU processes with gloo, also on a host with a GPU
# (`[training] device = "auto"` would pick CUDA there). Put first, so that a test can
# still ask for another device after it (later flags win).
CPU = ["--training.device", "cpu"]
KILL_ENV = "DBLOCKS_TEST_KILL_AFTER_STEP"
KILLED_EXIT_CODE = 137

# tiny and fast: every run in the tests starts from these
TINY = [
    "--training.seq_len", "32",
    "--training.local_batch_size", "2",
    "--metrics.log_freq", "1",
]

# torchrun with a rendezvous that cannot lose its port: the agent's store binds port 0
# and the workers connect to that live store (TORCHELASTIC_USE_AGENT_STORE)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def subprocess_env(
    record_dir: Path | None = None, extra_pythonpath: list[Path] = (), skew_blocks: bool = False,
    kill_after_step: int | None = None,
) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / "plugins"), *map(str, extra_pythonpath), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    # a launch from inside a torchrun'ed test run must not inherit its rendezvous
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE", SKEW_ENV, KILL_ENV):
        env.pop(key, None)
    if record_dir is not None:
        env[RECORD_ENV] = str(record_dir)
    if skew_blocks:
        env[SKEW_ENV] = "1"
    if kill_after_step is not None:
        env[KILL_ENV] = str(kill_after_step)
    return env


def torchrun_script(
    script: list[str], nproc: int = 1, *, env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N <script...>` in a subprocess, from the
    repo root (script: a path and its arguments, or `-m module ...`)."""
    cmd = [*TORCHRUN, "--nproc_per_node", str(nproc), *script]
    return subprocess.run(
        cmd, cwd=REPO, env=env if env is not None else subprocess_env(),
        capture_output=True, text=True, timeout=timeout,
    )


def torchrun(
    args: list[str], nproc: int = 1, *, record_dir: Path | None = None, timeout: float = 300,
    extra_pythonpath: list[Path] = (), skew_blocks: bool = False,
    kill_after_step: int | None = None,
) -> subprocess.CompletedProcess:
    """Run the trainer under torchrun, on the CPU (`CPU` first, then `args`). With
    record_dir, run this file's instrumented launcher instead of `-m
    diffusion_blocks.train` (same trainer, same arguments); skew_blocks (needs
    record_dir) makes every rank but 0 propose another block than rank 0; with
    kill_after_step (needs record_dir) every rank dies after that step (exit code 137).
    extra_pythonpath: folders put on the workers' PYTHONPATH (e.g. a user's module)."""
    assert record_dir is not None or not skew_blocks, "skew_blocks needs the instrumented launcher"
    assert kill_after_step is None or record_dir is not None, "the launcher kills"
    target = [str(LAUNCHER)] if record_dir is not None else ["-m", "diffusion_blocks.train"]
    env = subprocess_env(record_dir, extra_pythonpath, skew_blocks, kill_after_step)
    return torchrun_script([*target, *CPU, *args], nproc, env=env, timeout=timeout)


def output_of(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + "\n" + proc.stderr


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{output_of(proc)[-6000:]}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# metrics.jsonl / TensorBoard keys: torchtitan's MetricsProcessor's, and ours
LOSS = "loss_metrics/global_avg_loss"  # the w(sigma)-weighted loss, global mean
MAX_LOSS = "loss_metrics/global_max_loss"
GRAD_NORM = "grad_norm"
LR = "lr"
PREFIX = "diffusion_blocks/"
CE = PREFIX + "ce"                     # the unweighted CE (LM, ViT)
MSE = PREFIX + "mse"                   # the unweighted squared error (DiT)
BLOCK = PREFIX + "block"
SIGMA = PREFIX + "sigma_mean"


def steps_key(block: int) -> str:
    return f"{PREFIX}steps_block{block}"


def running_key(block: int, unweighted: str = "ce") -> str:
    return f"{PREFIX}running_{unweighted}_block{block}"


def is_training_row(row: dict) -> bool:
    return LOSS in row


def training_rows(path: Path) -> list[dict]:
    """The training rows of a metrics.jsonl (validation rows share the file)."""
    return [r for r in read_jsonl(path) if is_training_row(r)]


def validation_rows(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if not is_training_row(r) and not is_event_row(r)]


def is_event_row(row: dict) -> bool:
    """A row that marks an event (a resume, a skipped step), not metrics."""
    return "event" in row


def event_rows(path: Path) -> list[dict]:
    return [r for r in read_jsonl(path) if is_event_row(r)]


def block_steps(row: dict, num_blocks: int) -> list[int]:
    """Steps taken per block so far, as logged in one training row."""
    return [row[steps_key(b)] for b in range(num_blocks)]


def read_records(record_dir: Path, world_size: int) -> list[dict]:
    return [
        json.loads((Path(record_dir) / f"rank{r}.json").read_text()) for r in range(world_size)
    ]


# ---------------------------------------------------------------------------
# The instrumented launcher (runs inside each torchrun worker)


def _offloaded(module) -> bool:
    """True when FSDP2 keeps this unit's sharded state in host memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    if not isinstance(module, FSDPModule):
        return False
    group = module._get_fsdp_state()._fsdp_param_group
    return group is not None and isinstance(group.offload_policy, CPUOffloadPolicy)


def _instrument(trainer, record: dict) -> None:
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    model = trainer.model
    params = dict(model.named_parameters())
    record.update(
        rank=trainer.rank,
        world_size=torch.distributed.get_world_size(),
        model_mro=[c.__name__ for c in type(model).__mro__],
        model_is_fsdp=isinstance(model, FSDPModule),
        fsdp_layers=sum(isinstance(layer, FSDPModule) for layer in model.layers.values()),
        num_params=len(params),
        dtensor_params=sum(isinstance(p, DTensor) for p in params.values()),
        placements=sorted(
            {str(p.placements) for p in params.values() if isinstance(p, DTensor)}
        ),
        compiled_layers=sum(
            isinstance(layer, torch._dynamo.eval_frame.OptimizedModule)
            for layer in model.layers.values()
        ),
        offloaded_layers=sum(_offloaded(layer) for layer in model.layers.values()),
        root_offloaded=_offloaded(model),
        # the LM's embedding and head units (parallel.fsdp.shared_units), when FSDP units
        shared_units=[isinstance(getattr(model, name, None), FSDPModule)
                      for name in ("tok_embeddings", "output")],
        shared_units_offloaded=[_offloaded(getattr(model, name, None))
                                for name in ("tok_embeddings", "output")],
        layer_param_devices=sorted(
            {str(p.device) for p in model.layers.parameters()}
        ),
        layer_ranges=(
            [[r.start, r.stop] for r in model.partition.layer_ranges] if trainer.enabled else []
        ),
        steps=[],
    )

    calls: dict[str, int] = {}

    def count(name):
        def hook(module, args, kwargs=None):
            calls[name] = calls.get(name, 0) + 1

        return hook

    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(count(name))

    proposals: list[int] = []
    if trainer.enabled:
        schedule = trainer.block_schedule
        original_block_for_step = schedule.block_for_step
        # test-only: ranks > 0 propose another block than rank 0 (same generator, shifted)
        skew = trainer.rank if os.environ.get(SKEW_ENV) else 0

        def block_for_step(step):
            block = (original_block_for_step(step) + skew) % trainer.num_blocks
            proposals.append(block)
            return block

        schedule.block_for_step = block_for_step

    def local_checksum(tensors) -> float:
        return float(sum(
            (t.to_local() if isinstance(t, DTensor) else t).detach().double().sum()
            for t in tensors
        ))

    def checksums() -> dict:
        """Sums of this rank's local shards: shared modules and each block's layers."""
        if not trainer.enabled:
            return {}
        layer_ids = {id(p) for p in model.layers.parameters()}
        blocks = [
            local_checksum(p for i in r for p in model.layers[str(i)].parameters())
            for r in model.partition.layer_ranges
        ]
        shared = local_checksum(p for p in model.parameters() if id(p) not in layer_ids)
        return {"shared_checksum": shared, "block_checksums": blocks}

    record["initial"] = checksums()
    if trainer.layout is not None:
        record["group"] = trainer.layout.group
        record["group_size"] = trainer.layout.group_size
        original_save = trainer.checkpointer.save

        def save(step, last_step=False):
            original_save(step, last_step=last_step)
            record["steps"][-1]["after_save"] = checksums()

        trainer.checkpointer.save = save

    # what the trainer computes in a step, as it computes it
    grad_norms: list[float] = []
    original_clip = trainer.clip_gradients

    def clip_gradients():
        norm = original_clip()
        grad_norms.append(float(norm))
        return norm

    trainer.clip_gradients = clip_gradients

    local_losses: list[float] = []
    original_forward_backward = trainer.forward_backward_step

    def forward_backward_step(**kwargs):
        loss = original_forward_backward(**kwargs)
        local_losses.append(float(loss))
        return loss

    trainer.forward_backward_step = forward_backward_step

    logged: dict = {}
    original_log = trainer.metrics_processor.log

    def log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        logged.update(loss=float(global_avg_loss), grad_norm=float(grad_norm),
                      extra=dict(extra_metrics or {}))
        return original_log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)

    trainer.metrics_processor.log = log
    unweighted_key = PREFIX + trainer.family.task.unweighted_name

    original_train_step = trainer.train_step

    def train_step(data_iterator):
        calls.clear()
        proposals.clear()
        grad_norms.clear()
        local_losses.clear()
        logged.clear()
        returned = original_train_step(data_iterator)
        grad_layers = sorted(
            {
                int(name.split(".")[1])
                for name, p in params.items()
                if name.startswith("layers.") and p.grad is not None
            }
        )
        assert len(grad_norms) == 1, grad_norms
        record["steps"].append(
            {
                "step": trainer.step,
                "returned": returned,
                "proposed_block": proposals[0] if proposals else None,
                "block": trainer.block,
                # the global loss / unweighted loss the trainer logged on this rank
                # (None when the step was not logged), this rank's share of the loss
                # (sum over microbatches of local loss sum / global items)
                "loss": logged.get("loss"),
                "ce": logged.get("extra", {}).get(unweighted_key),
                "logged_block": logged.get("extra", {}).get(BLOCK),
                "local_loss": sum(local_losses),
                "microbatches": len(local_losses),
                "ran_layers": sorted(int(n) for n, c in calls.items() if c > 0),
                "grad_layers": grad_layers,
                "grads_are_dtensors": all(
                    isinstance(p.grad, DTensor) for p in params.values() if p.grad is not None
                ),
                "grad_norm": grad_norms[0],
                "logged_grad_norm": logged.get("grad_norm"),
                **checksums(),
            }
        )
        return returned

    trainer.train_step = train_step


def _die_after_step(trainer, step: int) -> None:
    """Every rank exits at once, with no clean-up, after step `step`'s save."""
    original_save = trainer.checkpointer.save

    def save(curr_step, last_step=False):
        original_save(curr_step, last_step=last_step)
        if curr_step == step:
            os._exit(KILLED_EXIT_CODE)

    trainer.checkpointer.save = save


def _finish(trainer, record: dict) -> None:
    record["finished_step"] = trainer.step
    record["ntokens_seen"] = trainer.ntokens_seen
    layer_params = {id(p) for p in trainer.model.layers.parameters()}
    record["layer_state_devices"] = sorted({
        str(v.device) for opt in trainer.optimizers.optimizers
        for p, state in opt.state.items() if id(p) in layer_params
        for v in state.values() if hasattr(v, "device") and v.dim() > 0
    })
    if trainer.enabled:
        record["block_steps"] = list(trainer.block_stats.steps)


def launch(argv: list[str]) -> None:
    """`diffusion_blocks.train.main(argv)` itself, with its BlockwiseTrainer instrumented."""
    from diffusion_blocks import train

    record_dir = Path(os.environ[RECORD_ENV])
    record_dir.mkdir(parents=True, exist_ok=True)

    class InstrumentedTrainer(train.BlockwiseTrainer):
        def __init__(self, job_config):
            super().__init__(job_config)
            self.test_record: dict = {}
            _instrument(self, self.test_record)
            if KILL_ENV in os.environ:
                _die_after_step(self, int(os.environ[KILL_ENV]))

        def train(self):
            super().train()
            _finish(self, self.test_record)
            path = record_dir / f"rank{self.rank}.json"
            path.write_text(json.dumps(self.test_record))

    train.BlockwiseTrainer = InstrumentedTrainer
    train.main(argv)


if __name__ == "__main__":
    launch(sys.argv[1:])


@contextmanager
def closing_trainers(build):
    """Yields make(*args) -> build(*args): trainers built in the test process, all
    closed afterwards, and the garbage collector torchtitan's Trainer disables turned
    back on (the body of the in-process `make_trainer` fixtures)."""
    trainers = []

    def make(*args):
        trainer = build(*args)
        trainers.append(trainer)
        return trainer

    try:
        yield make
    finally:
        for trainer in trainers:
            trainer.close()
        gc.enable()
