"""What the budget reports (lm.py, md4.py, recurrent.py) share: training runs planned
with checkpoints at fractions of their steps, trained up to N at a time and resumed
where they stopped, the --row selection, and the plot of a held-out figure against the
budget (PNG, Pillow; SVG beside it)."""

import argparse
import math
import re
import shlex
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

from PIL import Image, ImageDraw, ImageFont

import common
from diffusion_blocks.errors import ConfigError

T = TypeVar("T")


class Run(NamedTuple):
    overrides: list[str]  # the trainer's arguments
    steps: int
    dump: str             # its folder under the report's --out


def named_flags(text: str) -> tuple[str, list[str]]:
    """NAME=FLAGS (a --lever or --variant): NAME names a row and its run's folder, FLAGS
    are the trainer's --section.key value flags."""
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z0-9_]+", name) or not flags.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=FLAGS, NAME of lowercase letters, digits and _ (it "
            "names the row and its run's folder), FLAGS the trainer's --section.key value flags")
    return name, shlex.split(flags)


def budget_fractions(text: str) -> list[float]:
    """--budgets F,...: fractions of a run's steps, each in (0, 1], 1 among them."""
    try:
        fractions = [float(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if any(not 0 < f <= 1 for f in fractions) or 1.0 not in fractions:
        raise argparse.ArgumentTypeError(f"{text!r}: fractions in (0, 1], 1 among them")
    return fractions


def selected(rows: dict[str, T], names: list[str] | None, always: tuple[str, ...] = ()) -> dict[str, T]:
    """The rows --row names, in plan order, with the `always` rows (every row of the plan
    without --row); a name that is no row is one ConfigError naming the rows there are."""
    if names is None:
        return rows
    unknown = [name for name in names if name not in rows]
    if unknown:
        raise ConfigError(f"--row {unknown[0]!r}: no such row with these options; "
                          f"the rows are {', '.join(map(repr, rows))}")
    return {name: row for name, row in rows.items() if name in names or name in always}


def budget_steps(steps: int, budgets: list[float]) -> list[int]:
    """The optimizer steps at each budget fraction of a run of `steps` (at least 1)."""
    return [max(1, round(f * steps)) for f in budgets]


def checkpoint_interval(steps: int, interval: int | None, budgets: list[float]) -> int:
    """Saves at every `interval` steps and at each budget step before the last: the gcd of
    the interval and those steps (torchtitan saves at multiples of one interval, and at
    the last step whatever the interval: a run of 4157 steps saved every 50, not every
    step)."""
    return math.gcd(interval or steps, *(s for s in budget_steps(steps, budgets) if s != steps))


def checkpointed(overrides: list[str], steps: int, interval: int | None, budgets: list[float]) -> list[str]:
    """The overrides that save a run at its budget steps (and every `interval`), all kept."""
    return [*overrides, "--checkpoint.interval", str(checkpoint_interval(steps, interval, budgets)),
            "--checkpoint.keep_latest_k", "0"]


def train_runs(
    runs: dict[str, Run], out: Path, checkpoint_folder: str, parallel: int,
    train_missing: bool, waits_for: dict[str, str] | None = None,
) -> None:
    """Trains every run (each folder once: two rows may share a run), up to `parallel`
    at a time; a run named in `waits_for` starts after the run named there finished.
    With train_missing a run whose final checkpoint is there is skipped and an
    interrupted one resumes from its last checkpoint (torchtitan's own resume)."""
    waits_for = waits_for or {}
    todo: dict[str, Run] = {}
    for name, run in runs.items():
        final = out / run.dump / checkpoint_folder / f"step-{run.steps}"
        if train_missing and (final / ".metadata").is_file():
            print(f"{name}: {final} is there, not trained again", flush=True)
        elif run.dump not in {r.dump for r in todo.values()}:
            todo[name] = run
    futures: dict[str, Future] = {}

    def train_after(name: str, run: Run, first: Future | None) -> None:
        if first is not None:
            first.result()  # raises if the run it starts from failed
        common.train(name, run.overrides, run.steps, out / f"log_{run.dump}.txt", position=len(futures))

    # submitted in order: a run starts before the one that waits for it
    with ThreadPoolExecutor(parallel) as pool:
        for name, run in todo.items():
            futures[name] = pool.submit(train_after, name, run, futures.get(waits_for.get(name)))
        for future in futures.values():
            future.result()


# ---------------------------------------------------------------------------
# The plot: one line per model of a held-out figure against the budget fraction

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f",
           "#e377c2", "#bcbd22"]  # ten lines before a colour repeats


class Frame(NamedTuple):
    """Where the axes lie and how a (fraction, value) maps into them."""
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    fractions: list[float]
    low: float
    high: float

    def x(self, f: float) -> float:
        span = (max(self.fractions) - min(self.fractions)) or 1
        return self.left + (f - min(self.fractions)) / span * (self.right - self.left)

    def y(self, value: float) -> float:
        return self.bottom - (value - self.low) / (self.high - self.low) * (self.bottom - self.top)


def frame(budgets: dict, width: int, height: int, legend_width: int) -> Frame:
    names = list(next(iter(budgets.values())))
    values = [row[n]["ce"] for row in budgets.values() for n in names if math.isfinite(row[n]["ce"])]
    low, high = min(values), max(values)
    return Frame(width, height, 60, width - legend_width, 20, height - 40,
                 [float(f) for f in budgets], low, high if high > low else low + 1)


def lines(budgets: dict, box: Frame) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(name, colour, points) per model, its non-finite values left out."""
    names = list(next(iter(budgets.values())))
    return [(name, COLOURS[i % len(COLOURS)],
             [(box.x(float(f)), box.y(row[name]["ce"])) for f, row in budgets.items()
              if math.isfinite(row[name]["ce"])])
            for i, name in enumerate(names)]


def budget_svg(budgets: dict, y_label: str, width: int = 720, height: int = 400) -> str:
    """`budgets` {fraction: {model: {"ce": value, ...}}} as a hand-written SVG."""
    box = frame(budgets, width, height, legend_width=260)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{box.left}" y1="{box.bottom}" x2="{box.right}" y2="{box.bottom}" stroke="black"/>',
             f'<line x1="{box.left}" y1="{box.top}" x2="{box.left}" y2="{box.bottom}" stroke="black"/>',
             f'<text x="{(box.left + box.right) / 2}" y="{height - 8}" text-anchor="middle">budget '
             '(fraction of each run\'s steps)</text>',
             f'<text x="14" y="{(box.top + box.bottom) / 2}" transform="rotate(-90 14 '
             f'{(box.top + box.bottom) / 2})" text-anchor="middle">{y_label}</text>']
    for f in box.fractions:
        parts.append(f'<text x="{box.x(f):.1f}" y="{box.bottom + 15}" text-anchor="middle">{f:g}</text>')
    for value in (box.low, (box.low + box.high) / 2, box.high):
        parts.append(f'<text x="{box.left - 5}" y="{box.y(value) + 4:.1f}" text-anchor="end">{value:.2f}</text>')
    for i, (name, colour, points) in enumerate(lines(budgets, box)):
        xy = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="2"/>')
        label = name.replace("&", "&amp;").replace("<", "&lt;")
        parts.append(f'<text x="{box.right + 10}" y="{box.top + 16 * (i + 1)}" fill="{colour}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def budget_png(budgets: dict, path: Path, y_label: str, width: int = 900, height: int = 440) -> None:
    """The same plot as a PNG (Pillow's default font), written to `path`."""
    box = frame(budgets, width, height, legend_width=330)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.line([(box.left, box.bottom), (box.right, box.bottom)], fill="black")
    draw.line([(box.left, box.top), (box.left, box.bottom)], fill="black")
    draw.text(((box.left + box.right) / 2, height - 10), "budget (fraction of each run's steps)",
              fill="black", font=font, anchor="ms")
    draw.text((4, box.top - 14), y_label, fill="black", font=font)
    for f in box.fractions:
        draw.text((box.x(f), box.bottom + 14), f"{f:g}", fill="black", font=font, anchor="ms")
    for value in (box.low, (box.low + box.high) / 2, box.high):
        draw.text((box.left - 5, box.y(value)), f"{value:.2f}", fill="black", font=font, anchor="rm")
    for i, (name, colour, points) in enumerate(lines(budgets, box)):
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((box.right + 10, box.top + 16 * (i + 1)), name, fill=colour, font=font, anchor="lm")
    image.save(path)
