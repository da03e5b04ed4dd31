"""Sample grids: [-1, 1] images -> one uint8 picture (one row per class) -> PNG / TensorBoard."""

from pathlib import Path

import numpy as np
import torch


def to_uint8(images_NCHW: torch.Tensor) -> torch.Tensor:
    return ((images_NCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(
    images_NCHW: torch.Tensor, rows: int, scale: int = 1, padding: int = 1,
    frame_value: int = 128,
) -> np.ndarray:
    """(H_grid, W_grid, C) uint8; image i sits at row i // cols, column i % cols;
    each image is enlarged `scale` times (nearest) and framed by `padding` grey pixels."""
    count, channels, height, width = images_NCHW.shape
    cols = -(-count // rows)
    pixels = to_uint8(images_NCHW).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    cell_h, cell_w = height * scale + padding, width * scale + padding
    grid = torch.full(
        (channels, rows * cell_h + padding, cols * cell_w + padding), frame_value, dtype=torch.uint8
    )
    for i in range(count):
        r, c = divmod(i, cols)
        top, left = padding + r * cell_h, padding + c * cell_w
        grid[:, top : top + height * scale, left : left + width * scale] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(grid_HWC: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode_image = grid_HWC[..., 0] if grid_HWC.shape[-1] == 1 else grid_HWC
    Image.fromarray(np.ascontiguousarray(mode_image)).save(path)
    return path


def tensorboard_writers(metric_logger) -> list:
    """The SummaryWriters inside torchtitan's metric logger (none when TB is off)."""
    loggers = getattr(metric_logger, "_loggers", [metric_logger])
    return [lg.writer for lg in loggers if hasattr(lg, "writer")]
