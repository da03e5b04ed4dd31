"""torchtitan's MetricsProcessor (tokens/s per device, TFLOPS and MFU, data-loading
time, memory, TensorBoard / W&B) plus what a block-wise run adds:

- a second log line per logged step with the block trained, its mean noise level
  (sigma, or MD4's t), the unweighted CE and, per block, the steps taken and a
  running (EMA) CE; the same
  figures reach TensorBoard under `diffusion_blocks/...` (the trainer passes them as
  torchtitan's `extra_metrics`);
- `<dump_folder>/metrics.jsonl` on rank 0: every logged dict (training and
  validation) as one JSON line with its step, appended and flushed per line, so
  nothing is lost on a crash; plus event rows (`{"step": N, "event": ...}`, no
  metrics): "resume" when a run resumes from the checkpoint of step N (the rows of
  steps after N, which the killed run wrote and the resumed run writes again, are
  dropped from the file first, and their count noted), "fresh_start" (N = 0) when
  `[checkpoint] allow_fresh_start` starts over, and "nonfinite_skip" for a skipped
  step. Readers tell event rows by their "event" key.

On the CPU the memory figures are the process's peak resident set (titan_compat) and
MFU is NaN: there is no peak-FLOPS figure for a host CPU.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from torchtitan.components.metrics import BaseLogger, LoggerContainer, MetricsProcessor
from torchtitan.tools.logging import logger

from .. import titan_compat

BLOCKWISE_PREFIX = "diffusion_blocks/"


class JsonlLogger(BaseLogger):
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def drop_after(self, step: int) -> int:
        """Rewrite the file without the rows of steps after `step` (and without a line
        cut short by a kill); returns how many lines were dropped."""
        self.file.close()
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (at := _step_of(line)) is not None and at <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)
        self.file = open(self.path, "a")
        return len(lines) - len(kept)

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step", 0) if isinstance(record, dict) else None


def _json_value(value):
    """Plain JSON: a non-finite float (e.g. MFU on the CPU) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class BlockwiseMetricsProcessor(MetricsProcessor):
    def __init__(self, job_config, parallel_dims, tag: str | None = None):
        super().__init__(job_config, parallel_dims, tag)
        if titan_compat.running_on_cpu():
            self.gpu_peak_flops = math.nan
        self.jsonl: JsonlLogger | None = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            container = self.logger
            if not isinstance(container, LoggerContainer):
                container = LoggerContainer()
            self.jsonl = JsonlLogger(Path(job_config.job.dump_folder) / "metrics.jsonl")
            container.add_logger(self.jsonl)
            self.logger = container

    def log_event(self, step: int, event: str, **fields) -> None:
        """An event row in metrics.jsonl (rank 0; not a metric, not in TensorBoard)."""
        if self.jsonl is not None:
            self.jsonl.log({"event": event, **fields}, step)

    def mark_restart(self, step: int, checkpoint: str | None) -> None:
        """The run goes on after step `step` (0: from scratch): the killed run's rows of
        later steps are dropped, and a "resume" (or "fresh_start") row marks the place."""
        if self.jsonl is None:
            return
        dropped = self.jsonl.drop_after(step)
        if checkpoint is None:
            self.log_event(step, "fresh_start", dropped_rows=dropped)
        else:
            self.log_event(step, "resume", checkpoint=checkpoint, dropped_rows=dropped)

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics)
        line = blockwise_log_line(extra_metrics or {})
        if line:
            logger.info(line)


UNWEIGHTED_NAMES = ("ce", "mse")
LEVEL_NAMES = ("sigma", "t")  # the partitions' noise levels (EDM sigma, MD4's masking time)


def blockwise_log_line(metrics: dict[str, Any]) -> str:
    """'  block: 2  sigma: 0.41  ce: 1.2345  steps per block: [..]  running ce per block: [..]'"""
    p = BLOCKWISE_PREFIX
    name = next((n for n in UNWEIGHTED_NAMES if f"{p}{n}" in metrics), None)
    if name is None:
        return ""
    parts = []
    if f"{p}block" in metrics:
        parts.append(f"block: {int(metrics[f'{p}block'])}")
    for level in LEVEL_NAMES:
        if f"{p}{level}_mean" in metrics:
            parts.append(f"{level}: {metrics[f'{p}{level}_mean']:.3f}")
    parts.append(f"{name}: {metrics[f'{p}{name}']:.4f}")
    steps = [v for _, v in sorted(_per_block(metrics, "steps_block"))]
    if steps:
        running = dict(_per_block(metrics, f"running_{name}_block"))
        values = ["-" if b not in running else f"{running[b]:.3f}" for b in range(len(steps))]
        parts.append(f"steps per block: {[int(s) for s in steps]}")
        parts.append(f"running {name} per block: [{', '.join(values)}]")
    return "  " + "  ".join(parts)


def _per_block(metrics: dict[str, Any], name: str):
    prefix = f"{BLOCKWISE_PREFIX}{name}"
    for key, value in metrics.items():
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            yield int(key[len(prefix):]), value


def build_blockwise_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return BlockwiseMetricsProcessor(job_config, parallel_dims, tag)
