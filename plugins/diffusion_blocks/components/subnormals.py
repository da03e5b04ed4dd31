"""Subnormal floats on the CPU: flushed to zero, since CPU arithmetic on them takes a
slow path. A block trained at small sigmas grows confident enough to produce them
(softmax probabilities and gradients below float32's smallest normal, 1.2e-38) and a
long CPU run then slowed 2-4x (measured in docs/training.md). Values that small change
no figure this project reports."""

import torch


def flush_subnormals(device_type: str) -> None:
    """On the CPU, subnormal results become zero (a process-wide setting; CUDA runs keep
    their own defaults)."""
    if device_type == "cpu":
        torch.set_flush_denormal(True)
