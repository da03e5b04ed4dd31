"""The errors a user sees, and how entry points report them: a leaf module (it imports
nothing of ours), so low-level modules raise ConfigError without importing the loader."""

from __future__ import annotations

import os
import sys


class ConfigError(ValueError):
    """A user mistake in a job config; the message says what and where."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or resumed from; the message says which
    folder and why (one line, exit code 2, like a config mistake)."""


def origin_in(key_path, origins) -> str:
    """The file that set key_path, else the file of its nearest enclosing table."""
    for n in range(len(key_path), 0, -1):
        if key_path[:n] in origins:
            return origins[key_path[:n]]
        for path, origin in origins.items():
            if path[:n] == key_path[:n]:
                return origin
    return next(iter(origins.values()), "<defaults>")


def origin_of(job_config, section: str, key: str) -> str:
    """The file (or CLI flag) that set `[section] key`, for error messages."""
    origins = getattr(job_config, "config_origins", {})
    return origin_in((section, key), origins)


# user mistakes and runs stopped on purpose: one line on stderr and this exit code
EXIT_CODES = {ConfigError: 2, FloatingPointError: 1}


def _forget_recorded_traceback() -> None:
    """torchtitan's Trainer.__init__ is wrapped in torchelastic's @record, which writes
    the traceback of any exception raised inside it to the file torchrun names in
    TORCHELASTIC_ERROR_FILE, and torchrun prints that file in its failure summary: for a
    user's mistake the one line above is the whole story."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and os.path.isfile(path):
        os.remove(path)


def exit_on_config_error(fn):
    """Decorator for entry points: a ConfigError (exit code 2) or a run stopped on a
    non-finite value (FloatingPointError, exit code 1) ends in its one-line message."""

    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except tuple(EXIT_CODES) as e:
            print(f"error: {e}", file=sys.stderr)
            _forget_recorded_traceback()
            code = next(c for kind, c in EXIT_CODES.items() if isinstance(e, kind))
            raise SystemExit(code) from None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper
