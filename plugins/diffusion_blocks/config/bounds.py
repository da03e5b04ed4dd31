"""Allowed values of settings: one mechanism for config keys and tool flags.

A `Bounds` says which numbers a setting takes (a range, finite unless infinity is
allowed, plus special values such as -1 = "derive it"); `problem(value)` returns what is
wrong with a value, or None. Config sections list their numeric keys' bounds and
`bounds_problems` turns them into the (key, problem) pairs of `config.SECTION_CHECKS`;
tools give argparse `number_arg(int, Bounds(...))` as a flag's `type=`, so a bad flag is
argparse's one-line error. The other `*_arg` functions are `type=`s for lists, files
and devices, so every tool flag is checked before the tool starts its work.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable


def _number(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Bounds:
    low: float | None = None
    high: float | None = None
    low_open: bool = False   # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    allow_inf: bool = False  # +-inf allowed (when within low / high)
    special: tuple = ()      # values allowed outside the range, e.g. (-1,)
    special_meaning: str = ""  # what they mean, e.g. "all"

    def describe(self) -> str:
        """'in [0, 0.5]', '>= 1', '> 0' or '' (any number), with the special values."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        else:
            text = ""
        if self.special:
            values = " or ".join(_number(v) for v in self.special)
            meaning = f" ({self.special_meaning})" if self.special_meaning else ""
            text += f", or {values}{meaning}"
        return text

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value`, or None (None itself: an unset optional key)."""
        if value is None or (value in self.special and not isinstance(value, bool)):
            return None
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return f"must be a finite number {self.describe()}".rstrip() + f", got {value}"
        below = self.low is not None and (
            value < self.low or (self.low_open and value == self.low)
        )
        above = self.high is not None and (
            value > self.high or (self.high_open and value == self.high)
        )
        if below or above:
            verb = "lie" if self.low is not None and self.high is not None else "be"
            return f"must {verb} {self.describe()}, got {_number(value)}"
        return None


# the usual ones
ANY_FINITE = Bounds()
AT_LEAST_1 = Bounds(low=1)
NON_NEGATIVE = Bounds(low=0)
POSITIVE = Bounds(low=0, low_open=True)
UNIT_INTERVAL = Bounds(low=0, high=1)
SEED = Bounds(low=0, high=2**32 - 1)  # fits every generator's seed after our offsets


def bounds_problems(section: Any, bounds: dict[str, Bounds]) -> list[tuple[str, str]]:
    """(key, problem) for every key of `section` outside its bounds; dotted keys
    ('dataloader.num_workers') reach into nested tables."""
    problems = []
    for key, allowed in bounds.items():
        value = section
        for part in key.split("."):
            value = getattr(value, part)
        problem = allowed.problem(value)
        if problem:
            problems.append((key, problem))
    return problems


def number_arg(kind: type, bounds: Bounds) -> Callable[[str], Any]:
    """An argparse `type=`: parses `kind` (int or float) and refuses values outside
    `bounds` with argparse's one-line error ('argument --steps: must be >= 1, got 0')."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        problem = bounds.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def number_list_arg(kind: type, bounds: Bounds) -> Callable[[str], list]:
    """An argparse `type=` for a comma-separated, non-empty list ('2,4,8'), each item
    checked like `number_arg`."""
    item = number_arg(kind, bounds)

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [item(p) for p in parts]

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def choice_list_arg(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse `type=` for a comma-separated, non-empty list of `choices`."""

    def parse(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [p for p in parts if p not in choices]
        if unknown or not parts:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return parts

    parse.__name__ = "list"
    return parse


def existing_file_arg(text: str) -> str:
    """An argparse `type=`: a file that exists."""
    from pathlib import Path

    if not Path(text).expanduser().is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def output_file_arg(text: str) -> str:
    """An argparse `type=`: a file to write, whose folder exists (checked before the
    work that produces it, not after)."""
    from pathlib import Path

    folder = Path(text).expanduser().resolve().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} does not exist")
    return text


def device_arg(text: str) -> str:
    """An argparse `type=`: a torch device this machine has ('cpu', 'cuda', 'cuda:1')."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s); use cpu"
            )
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu or cuda[:N]")
    return text
