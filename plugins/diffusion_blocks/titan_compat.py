"""The one place where torchtitan 0.2.2's module-level assumptions are adapted.

1. CPU runs. torchtitan reads the accelerator once, at import, into module-level names:
   `torchtitan.tools.utils.device_type` is `_get_available_device_type() or "cuda"` (so
   "cuda" on a machine without one) and `device_module` is `torch.cuda`; several
   modules import those names (the Trainer builds `cuda:N`, ParallelDims builds its
   meshes on "cuda", init_distributed picks NCCL, the memory monitor, the memory
   snapshot and set_pg_timeouts call torch.cuda). `use_device` rebinds them to "cpu"
   and a host device module when the run is on the CPU, so torchtitan's own code runs
   there unchanged: its init_distributed then starts gloo, with `[comm]` honoured (and
   no second "cpu:gloo" backend for `[training] enable_cpu_offload`: the host is the device).
   torchtitan's profiler context lists `None` as the accelerator activity when there
   is none, which torch.profiler rejects: on the CPU the Trainer gets
   `profile_on_host`, the same traces (same schedule, folders and file names) of CPU
   activity. On a CUDA run nothing is touched.

2. The train spec a block-wise run uses. torchtitan's Trainer looks its spec up by
   `[model] name` and builds CheckpointManager itself. `trainer_overrides` makes that
   lookup return the run's resolved spec (e.g. stock `llama3` with the DiffusionBlocks
   parallelize / validator, or the end-to-end twin's model class) and the checkpointer
   our subclass, only while BlockwiseTrainer.__init__ runs torchtitan's constructor.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from types import SimpleNamespace

import torch

import torchtitan.components.metrics as titan_metrics
import torchtitan.distributed.parallel_dims as titan_parallel_dims
import torchtitan.distributed.utils as titan_dist_utils
import torchtitan.protocols.train_spec as titan_train_spec
import torchtitan.tools.profiling as titan_profiling
import torchtitan.tools.utils as titan_utils
import torchtitan.train as titan_train
from torchtitan.tools.logging import logger

# (module, names it holds) that read torchtitan's device type / module
_DEVICE_TYPE_HOLDERS = (titan_utils, titan_metrics, titan_dist_utils, titan_parallel_dims)
_DEVICE_MODULE_HOLDERS = (titan_utils, titan_metrics, titan_dist_utils, titan_profiling)


def _read_proc_status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class HostDeviceModule:
    """What torchtitan asks of `torch.cuda`, answered for the host (CPU).

    Memory figures are the process's resident set: the peak is Linux's VmHWM, which
    `reset_peak_memory_stats` resets (writing 5 to /proc/self/clear_refs), so
    torchtitan's per-log-interval peak works as on CUDA. There is no allocator history
    on the CPU: memory snapshots are CUDA-only (`memory` is absent on purpose).
    """

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"cpu ({platform.processor() or platform.machine()})"

    @staticmethod
    def get_device_properties(device=None):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return SimpleNamespace(total_memory=total)

    @staticmethod
    def memory_stats(device=None) -> dict[str, int]:
        peak = _read_proc_status_kib("VmHWM") * 1024
        return {
            "active_bytes.all.peak": peak,
            "reserved_bytes.all.peak": peak,
            "num_alloc_retries": 0,
            "num_ooms": 0,
        }

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def synchronize(device=None) -> None:
        pass


HOST_DEVICE_MODULE = HostDeviceModule()


@contextlib.contextmanager
def profile_on_host(profiling_config, *, global_step: int = 0, base_folder: str = "",
                    leaf_folder: str = ""):
    """torchtitan's `maybe_enable_profiling` for a machine without an accelerator: the
    `[profiling]` schedule (profile_freq, profiler_warmup, profiler_active) and trace
    files `<save_traces_folder>/iteration_<step>/rank<R>_trace.json`, CPU activity."""
    if not profiling_config.enable_profiling:
        yield None
        return
    trace_dir = os.path.join(base_folder, profiling_config.save_traces_folder)
    rank = torch.distributed.get_rank()
    warmup, active = profiling_config.profiler_warmup, profiling_config.profiler_active
    wait = profiling_config.profile_freq - (warmup + active)
    assert wait >= 0, "profile_freq must be greater than or equal to warmup + active"

    def trace_handler(prof):
        folder = os.path.join(trace_dir, f"iteration_{prof.step_num}", leaf_folder)
        os.makedirs(folder, exist_ok=True)
        begin = time.monotonic()
        prof.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))
        logger.info(f"Dumped profiler traces at step {prof.step_num} in "
                    f"{time.monotonic() - begin:.2f} seconds")

    logger.info(f"Profiling active (CPU activity). Traces will be saved at {trace_dir}")
    os.makedirs(trace_dir, exist_ok=True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
        on_trace_ready=trace_handler,
        record_shapes=True,
    ) as profiler:
        profiler.step_num = global_step
        yield profiler


def use_device(device_type: str) -> None:
    """Point torchtitan's module-level device names at `device_type` ("cuda" or "cpu")."""
    if device_type == "cuda":
        return  # torchtitan's defaults
    assert device_type == "cpu", device_type
    for module in _DEVICE_TYPE_HOLDERS:
        module.device_type = "cpu"
    for module in _DEVICE_MODULE_HOLDERS:
        module.device_module = HOST_DEVICE_MODULE
    titan_train.maybe_enable_profiling = profile_on_host
    titan_dist_utils.init_distributed = init_distributed_on_host


def init_distributed_on_host(comm_config, enable_cpu_backend: bool = False, **kwargs):
    """torchtitan's init_distributed on the CPU. `[training] enable_cpu_offload` asks it
    for a second, host backend ("cpu:gloo" beside the device's): on the CPU the device's
    backend already is gloo on the host, and the doubled "cpu:gloo,cpu:gloo" is refused."""
    return _TITAN_INIT_DISTRIBUTED(comm_config, enable_cpu_backend=False, **kwargs)


_TITAN_INIT_DISTRIBUTED = titan_dist_utils.init_distributed


def running_on_cpu() -> bool:
    return titan_utils.device_type == "cpu"


@contextlib.contextmanager
def trainer_overrides(model_name: str, spec, checkpoint_manager_cls):
    """While torchtitan's Trainer.__init__ runs: `get_train_spec(model_name)` returns
    `spec`, and the checkpointer it builds is `checkpoint_manager_cls`."""
    original_lookup = titan_train_spec.get_train_spec
    original_manager = titan_train.CheckpointManager

    def lookup(name: str):
        return spec if name == model_name else original_lookup(name)

    titan_train_spec.get_train_spec = lookup
    titan_train.CheckpointManager = checkpoint_manager_cls
    try:
        yield
    finally:
        titan_train_spec.get_train_spec = original_lookup
        titan_train.CheckpointManager = original_manager
